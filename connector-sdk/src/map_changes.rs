//! Following the topic map from a source's read loop: sources that subscribe per topic
//! (bindings, subscriptions) wait on [`MapChanges::changed`] beside their broker, and
//! subscribe or unsubscribe when it fires.

use std::sync::Arc;

use tokio::sync::watch;

use crate::runtime::SourceContext;
use crate::topic_map::TopicMap;

/// The changes of a connector's topic map, when its topics follow the map.
#[derive(Debug)]
pub struct MapChanges(Option<watch::Receiver<Arc<TopicMap>>>);

impl MapChanges {
    /// The changes of `ctx`'s map when no `topics` are configured; else none, ever.
    pub fn of(ctx: &SourceContext) -> Self {
        Self(ctx.topics_follow_map().then(|| ctx.topics.subscribe()))
    }

    /// Waits for the next change of the map; forever when not following it (or once the
    /// map is gone, at shutdown). Cancel-safe.
    pub async fn changed(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    self.0 = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}
