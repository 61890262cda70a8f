//! Hand-off of stream chunks from the worker running a streaming job to the HTTP response
//! holding the client's connection. Streaming jobs are pinned to the instance that holds
//! the connection, so this only ever crosses tasks, never processes.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::queue::JobError;

#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// A `chat.completion.chunk`, forwarded as it came.
    Chunk(Value),
    /// The job failed; after the first chunk this ends the stream with an error event.
    Error(JobError),
    /// The stream ended cleanly.
    Done,
}

#[derive(Default)]
pub struct StreamHub {
    senders: Mutex<HashMap<String, mpsc::Sender<StreamEvent>>>,
}

impl StreamHub {
    /// Opens the channel of a job before it is inserted.
    pub fn open(&self, job_id: &str) -> mpsc::Receiver<StreamEvent> {
        let (tx, rx) = mpsc::channel(64);
        self.lock().insert(job_id.to_string(), tx);
        rx
    }

    /// The sender of a job, if its client is still connected.
    pub fn sender(&self, job_id: &str) -> Option<mpsc::Sender<StreamEvent>> {
        let mut map = self.lock();
        match map.get(job_id) {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            Some(_) => {
                map.remove(job_id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, job_id: &str) {
        self.lock().remove(job_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<StreamEvent>>> {
        self.senders.lock().unwrap_or_else(|e| e.into_inner())
    }
}
