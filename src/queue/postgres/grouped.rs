//! Group commit for the writes every request makes (accept, end of an attempt).
//!
//! Writes of one kind that arrive while earlier ones are under way go out together: one
//! statement, one round trip, one commit for all of them. A lone write goes out at once,
//! so a quiet gateway waits for nothing; under load the groups grow by themselves. On the
//! 2-core benchmark machine the database, not the gateway, spent most of the CPU of a
//! request, much of it on per-statement work and commits (see docs/BENCHMARKS.md).
//!
//! A group that fails is run again write by write, so one bad write fails alone and the
//! others are not held responsible for it (as in the SQLite writer).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::queue::{StoreError, StoreResult};

/// Writes of one group, at most.
const MAX_GROUP: usize = 256;

type Reply<O> = oneshot::Sender<StoreResult<O>>;
type RunGroup<I, O> =
    dyn Fn(Vec<I>) -> Pin<Box<dyn Future<Output = Vec<StoreResult<O>>> + Send>> + Send + Sync;

pub struct Grouped<I, O> {
    inner: Arc<Inner<I, O>>,
}

struct Inner<I, O> {
    run: Box<RunGroup<I, O>>,
    in_flight: usize,
    state: Mutex<State<I, O>>,
}

struct State<I, O> {
    waiting: Vec<(I, Reply<O>)>,
    running: usize,
}

impl<I: Send + 'static, O: Send + 'static> Grouped<I, O> {
    /// Runs groups with `run`, which answers each write of a group in order, at most
    /// `in_flight` groups at a time.
    pub fn new<F, Fut>(in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<StoreResult<O>>> + Send + 'static,
    {
        Self {
            inner: Arc::new(Inner {
                run: Box::new(move |items| Box::pin(run(items))),
                in_flight: in_flight.max(1),
                state: Mutex::new(State {
                    waiting: Vec::new(),
                    running: 0,
                }),
            }),
        }
    }

    /// Writes `item` and returns its answer. A write that finds nothing under way runs
    /// on the caller's task (no hand-off: the quiet path stays as fast as a plain
    /// statement); one that finds groups under way waits for the next group, which a
    /// task of its own runs, so that no caller who gives up can take others' writes down
    /// with it.
    pub async fn submit(&self, item: I) -> StoreResult<O> {
        let queued = {
            let mut state = self.inner.lock();
            if state.running < self.inner.in_flight && state.waiting.is_empty() {
                state.running += 1;
                Err(item)
            } else {
                let (reply, answer) = oneshot::channel();
                state.waiting.push((item, reply));
                if state.running < self.inner.in_flight {
                    state.running += 1;
                    let group = take_group(&mut state.waiting);
                    tokio::spawn(self.inner.clone().run_groups(group));
                }
                Ok(answer)
            }
        };
        let answer = match queued {
            Ok(answer) => answer,
            Err(item) => {
                // Alone: run it here. The slot passes on when this ends, or is dropped.
                let slot = Slot(self.inner.clone());
                let result = (self.inner.run)(vec![item]).await.pop();
                drop(slot);
                return result
                    .unwrap_or_else(|| Err(StoreError::Write("a write went unanswered".into())));
            }
        };
        answer
            .await
            .map_err(|_| StoreError::Write("the write was dropped".into()))?
    }
}

impl<I: Send + 'static, O: Send + 'static> Inner<I, O> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<I, O>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `group`, then every group that formed meanwhile, then gives its slot back.
    async fn run_groups(self: Arc<Self>, mut group: Vec<(I, Reply<O>)>) {
        loop {
            let (items, replies): (Vec<I>, Vec<Reply<O>>) = group.into_iter().unzip();
            let results = (self.run)(items).await;
            debug_assert_eq!(results.len(), replies.len());
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            let mut state = self.lock();
            if state.waiting.is_empty() {
                state.running -= 1;
                return;
            }
            group = take_group(&mut state.waiting);
        }
    }
}

fn take_group<T>(waiting: &mut Vec<T>) -> Vec<T> {
    let n = waiting.len().min(MAX_GROUP);
    waiting.drain(..n).collect()
}

/// A group slot held by a write running on its caller's task. When it is given back
/// (the write ended or its caller gave up), writes that queued meanwhile get it.
struct Slot<I: Send + 'static, O: Send + 'static>(Arc<Inner<I, O>>);

impl<I: Send + 'static, O: Send + 'static> Drop for Slot<I, O> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if state.waiting.is_empty() {
            state.running -= 1;
            return;
        }
        let group = take_group(&mut state.waiting);
        drop(state);
        tokio::spawn(self.0.clone().run_groups(group));
    }
}

/// Runs a group with `all`; if that fails, runs each write alone with `all` again, so
/// that only the write at fault fails.
pub async fn all_or_each<I, O, F, Fut>(items: Vec<I>, all: F) -> Vec<StoreResult<O>>
where
    I: Clone,
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = StoreResult<Vec<O>>>,
{
    if items.len() > 1 {
        let each = items.clone();
        match all(items).await {
            Ok(outs) => return outs.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::debug!(error = %e, writes = each.len(), "a grouped write failed; writing one by one");
                let mut results = Vec::with_capacity(each.len());
                for item in each {
                    results.push(one(&all, item).await);
                }
                return results;
            }
        }
    }
    let mut results = Vec::with_capacity(1);
    for item in items {
        results.push(one(&all, item).await);
    }
    results
}

async fn one<I, O, F, Fut>(all: &F, item: I) -> StoreResult<O>
where
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = StoreResult<Vec<O>>>,
{
    all(vec![item])
        .await?
        .pop()
        .ok_or_else(|| StoreError::Write("a write went unanswered".into()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Doubles every number; a group holding 13 fails as a whole.
    async fn double(items: Vec<i64>) -> StoreResult<Vec<i64>> {
        if items.contains(&13) {
            return Err(StoreError::Write("13".into()));
        }
        Ok(items.into_iter().map(|i| i * 2).collect())
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone() {
        let results = all_or_each(vec![1, 13, 3], double).await;
        assert_eq!(results[0].as_ref().ok(), Some(&2));
        assert!(results[1].is_err());
        assert_eq!(results[2].as_ref().ok(), Some(&6));
    }

    #[tokio::test]
    async fn writes_that_wait_go_out_together_and_each_gets_its_answer() {
        let groups = Arc::new(AtomicUsize::new(0));
        let counted = groups.clone();
        let grouped = Arc::new(Grouped::new(1, move |items: Vec<i64>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                // Slow enough that the other writes queue up behind the first group.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                all_or_each(items, double).await
            }
        }));
        let writes: Vec<_> = (0..50)
            .map(|i| {
                let g = grouped.clone();
                tokio::spawn(async move { (i, g.submit(i).await) })
            })
            .collect();
        for w in writes {
            let (i, r) = w.await.unwrap();
            if i == 13 {
                assert!(r.is_err());
            } else {
                assert_eq!(r.unwrap(), i * 2);
            }
        }
        let n = groups.load(Ordering::SeqCst);
        assert!(n < 50, "50 writes went out in {n} groups");
    }
}
