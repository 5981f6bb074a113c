//! [`TopicChanges`]: what a source that subscribes per topic (bindings, LISTEN,
//! subscriptions) waits on to follow the topic map without a restart.

use std::sync::Arc;

use tokio::sync::watch;

use crate::runtime::SourceContext;
use crate::topic_map::TopicMap;

/// The topic map's changes, when the source's topics come from it (no `topics`
/// configured); otherwise nothing ever changes.
#[derive(Debug)]
pub struct TopicChanges(Option<watch::Receiver<Arc<TopicMap>>>);

impl TopicChanges {
    /// Follows `ctx`'s topic map when [`SourceContext::topics_follow_map`].
    pub fn new(ctx: &SourceContext) -> Self {
        Self(ctx.topics_follow_map().then(|| ctx.topics.subscribe()))
    }

    /// Waits for the next change of the map; forever when not following it (or once the
    /// map is gone). Cancel-safe: use it in a `select!`.
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
