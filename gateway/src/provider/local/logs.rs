//! A function's log: the last lines kept in memory for `/system/logs`, new lines
//! broadcast to followers, and everything also written to the gateway's own log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::broadcast;

use crate::names::FunctionRef;
use crate::provider::{LogRequest, LogStream};
use crate::types::LogMessage;

/// One function's log.
#[derive(Debug)]
pub struct LogBook {
    function: FunctionRef,
    capacity: usize,
    lines: Mutex<VecDeque<(SystemTime, LogMessage)>>,
    live: broadcast::Sender<(SystemTime, LogMessage)>,
}

impl LogBook {
    /// An empty log keeping `capacity` lines.
    pub fn new(function: FunctionRef, capacity: usize) -> Arc<Self> {
        let (live, _) = broadcast::channel(256);
        Arc::new(Self {
            function,
            capacity: capacity.max(1),
            lines: Mutex::new(VecDeque::new()),
            live,
        })
    }

    /// Appends one line written by `instance`.
    pub fn write(&self, instance: &str, text: &str) {
        let now = SystemTime::now();
        tracing::info!(target: "function", function = %self.function, instance, "{text}");
        let message = LogMessage {
            name: self.function.name.clone(),
            namespace: self.function.namespace.clone(),
            instance: instance.to_owned(),
            timestamp: humantime::format_rfc3339_nanos(now).to_string(),
            text: text.to_owned(),
        };
        {
            let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
            if lines.len() == self.capacity {
                lines.pop_front();
            }
            lines.push_back((now, message.clone()));
        }
        // Nobody following is the usual case, not an error.
        let _ = self.live.send((now, message));
    }

    /// Copies each line of `reader` (a process's stdout or stderr) into the log until it
    /// closes.
    pub fn pipe<R>(self: &Arc<Self>, instance: String, reader: R) -> tokio::task::JoinHandle<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let book = Arc::clone(self);
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                book.write(&instance, &line);
            }
        })
    }

    /// The lines `request` asks for, then (with `follow`) new lines as they come.
    pub fn read(&self, request: &LogRequest) -> LogStream {
        let wanted = {
            let instance = request.instance.clone();
            let since = request.since;
            move |at: &SystemTime, m: &LogMessage| {
                instance.as_deref().is_none_or(|i| i == m.instance)
                    && since.is_none_or(|s| *at >= s)
            }
        };
        // Subscribe before copying the history so no line falls between the two.
        let receiver = self.live.subscribe();
        let history: Vec<LogMessage> = {
            let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
            let matching: Vec<&(SystemTime, LogMessage)> =
                lines.iter().filter(|(at, m)| wanted(at, m)).collect();
            let skip = request
                .tail
                .map_or(0, |tail| matching.len().saturating_sub(tail));
            matching
                .into_iter()
                .skip(skip)
                .map(|(_, m)| m.clone())
                .collect()
        };
        let last = history.last().map(|m| m.timestamp.clone());
        let history = futures::stream::iter(history);
        if !request.follow {
            return history.boxed();
        }
        let live = futures::stream::unfold(receiver, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(item) => return Some((item, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .filter_map(move |(at, m)| {
            // Lines already sent from the history may arrive again on the live channel.
            let fresh = last.as_ref().is_none_or(|l| m.timestamp > *l);
            let keep = fresh && wanted(&at, &m);
            async move { keep.then_some(m) }
        });
        history.chain(live).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> Arc<LogBook> {
        LogBook::new(
            FunctionRef {
                name: "f".into(),
                namespace: "ns".into(),
            },
            3,
        )
    }

    #[tokio::test]
    async fn keeps_the_last_lines_and_tails() {
        let b = book();
        for i in 0..5 {
            b.write("p1", &format!("line {i}"));
        }
        let all: Vec<String> = b
            .read(&LogRequest::default())
            .map(|m| m.text)
            .collect()
            .await;
        assert_eq!(all, ["line 2", "line 3", "line 4"]);
        let tail: Vec<String> = b
            .read(&LogRequest {
                tail: Some(1),
                ..LogRequest::default()
            })
            .map(|m| m.text)
            .collect()
            .await;
        assert_eq!(tail, ["line 4"]);
    }

    #[tokio::test]
    async fn follow_sends_new_lines() {
        let b = book();
        b.write("p1", "old");
        let mut s = b.read(&LogRequest {
            follow: true,
            ..LogRequest::default()
        });
        assert_eq!(s.next().await.map(|m| m.text).as_deref(), Some("old"));
        b.write("p2", "new");
        let m = s.next().await.unwrap();
        assert_eq!((m.text.as_str(), m.instance.as_str()), ("new", "p2"));
    }
}
