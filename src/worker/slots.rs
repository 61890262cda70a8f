//! This instance's call slots per provider: a semaphore of `concurrency` permits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

#[derive(Default)]
pub struct CallSlots {
    by_provider: Mutex<HashMap<String, Slots>>,
}

struct Slots {
    semaphore: Arc<Semaphore>,
    /// The `concurrency` the permits stand for.
    concurrency: u32,
    /// Permits to take out of use when they come back: a reload lowered `concurrency`
    /// while more calls than the new figure were running.
    owed: usize,
}

impl CallSlots {
    /// The slots of `provider`, resized first when a reload changed `concurrency`: more
    /// permits at once, or fewer as soon as the running calls give theirs back.
    pub fn of(&self, provider: &str, concurrency: u32) -> Arc<Semaphore> {
        let mut map = self.by_provider.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(provider) {
            let slots = Slots {
                semaphore: Arc::new(Semaphore::new(concurrency as usize)),
                concurrency,
                owed: 0,
            };
            map.insert(provider.to_string(), slots);
        }
        let Some(slots) = map.get_mut(provider) else {
            unreachable!("inserted above")
        };
        let (old, new) = (slots.concurrency as usize, concurrency as usize);
        if new > old {
            let more = new - old;
            let cancelled = more.min(slots.owed);
            slots.owed -= cancelled;
            slots.semaphore.add_permits(more - cancelled);
        } else {
            slots.owed += old - new;
        }
        slots.concurrency = concurrency;
        if slots.owed > 0 {
            slots.owed -= slots.semaphore.forget_permits(slots.owed);
        }
        slots.semaphore.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_concurrency_counts_the_calls_still_running() {
        let slots = CallSlots::default();
        let sem = slots.of("a", 3);
        let running = sem.clone().try_acquire_many_owned(2).unwrap();
        assert_eq!(slots.of("a", 3).available_permits(), 1);

        // Down to 1 with 2 running: no slot until both have ended, then one.
        assert_eq!(slots.of("a", 1).available_permits(), 0);
        drop(running);
        assert_eq!(slots.of("a", 1).available_permits(), 1);

        // Up to 4 with 1 running: 3 free, and 4 once it ends.
        let one = sem.clone().try_acquire_owned().unwrap();
        assert_eq!(slots.of("a", 4).available_permits(), 3);
        drop(one);
        assert_eq!(slots.of("a", 4).available_permits(), 4);

        // Down and up again before the running calls ended: nothing lost or gained.
        let all = sem.clone().try_acquire_many_owned(4).unwrap();
        slots.of("a", 1);
        assert_eq!(slots.of("a", 2).available_permits(), 0);
        drop(all);
        assert_eq!(slots.of("a", 2).available_permits(), 2);
        assert_eq!(slots.of("b", 2).available_permits(), 2);
    }
}
