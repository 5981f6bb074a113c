//! [`TopicChanges`]: what a source that subscribes per topic (bindings, LISTEN,
//! subscriptions) waits on to follow the topic map without a restart.

use std::sync::Arc;

use tokio::sync::watch;

use crate::runtime::SourceContext;
use crate::topic_map::TopicMap;

/// The topic map's changes, when the source's topics come from it (no `topics`
/// configured); otherwise nothing ever changes.
///
/// A change stays due until the source reports it [`applied`](Self::applied): `pull` is
/// dropped whenever the pump settles a completion first, and a change taken but dropped
/// while its subscriptions were being made would otherwise be forgotten.
#[derive(Debug)]
pub struct TopicChanges {
    rx: Option<watch::Receiver<Arc<TopicMap>>>,
    due: bool,
}

impl TopicChanges {
    /// Follows `ctx`'s topic map when [`SourceContext::topics_follow_map`].
    pub fn new(ctx: &SourceContext) -> Self {
        Self {
            rx: ctx.topics_follow_map().then(|| ctx.topics.subscribe()),
            due: false,
        }
    }

    /// Returns at once while a change is due (not yet [`applied`](Self::applied));
    /// otherwise waits for the next change of the map, forever when not following it (or
    /// once the map is gone). Cancel-safe: use it in a `select!`.
    pub async fn changed(&mut self) {
        if self.due {
            return;
        }
        match &mut self.rx {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    self.rx = None;
                    std::future::pending::<()>().await;
                }
                self.due = true;
            }
            None => std::future::pending().await,
        }
    }

    /// The source's subscriptions now match the topic map: [`changed`](Self::changed)
    /// waits for the next change.
    pub fn applied(&mut self) {
        self.due = false;
    }

    /// Makes the subscriptions due again, as after a change (a reconnect that lost them):
    /// [`changed`](Self::changed) returns at once until they are applied.
    pub fn reapply(&mut self) {
        self.due = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic_map::TopicMap;
    use futures::FutureExt;

    #[tokio::test]
    async fn a_change_stays_due_until_applied_even_when_its_handling_was_dropped() {
        let (tx, rx) = watch::channel(Arc::new(TopicMap::default()));
        let mut changes = TopicChanges {
            rx: Some(rx),
            due: false,
        };
        assert!(
            changes.changed().now_or_never().is_none(),
            "nothing changed yet"
        );
        tx.send_replace(Arc::new(TopicMap::default()));
        assert!(changes.changed().now_or_never().is_some());
        // Its handling dropped before `applied`: still due.
        assert!(changes.changed().now_or_never().is_some());
        changes.applied();
        assert!(changes.changed().now_or_never().is_none());
        changes.reapply();
        assert!(changes.changed().now_or_never().is_some());
    }

    #[tokio::test]
    async fn not_following_the_map_is_never_due_unless_reapplied() {
        let mut changes = TopicChanges {
            rx: None,
            due: false,
        };
        assert!(changes.changed().now_or_never().is_none());
        changes.reapply();
        assert!(changes.changed().now_or_never().is_some());
    }
}
