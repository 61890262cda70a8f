//! One store test-suite, run against every backend (river's `riverdrivertest` idea): each
//! test below takes an `Arc<dyn QueueStore>` and is instantiated once for SQLite (a fresh
//! file) and once for Postgres (a fresh database), so the two cannot drift apart.

use std::sync::Arc;
use std::time::Duration;

use llm_orch::config::SqliteSync;
use llm_orch::queue::postgres::PostgresStore;
use llm_orch::queue::sqlite::SqliteStore;
use llm_orch::queue::*;

use crate::support::jobs::{REQUEST, new_job as job};
use crate::support::pg::TestDb;

type Store = Arc<dyn QueueStore>;

/// What keeps a store's backing alive for the test.
enum Backing {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] TestDb),
}

async fn sqlite_store() -> (Store, Backing) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("orch.db"), SqliteSync::Normal)
        .await
        .unwrap();
    (Arc::new(store), Backing::Sqlite(dir))
}

async fn postgres_store() -> (Store, Backing) {
    let db = TestDb::create().await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    (Arc::new(store), Backing::Postgres(db))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _backing) = super::sqlite_store().await;
                    super::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _backing) = super::postgres_store().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

conformance!(
    insert_and_get,
    idempotent_insert,
    concurrent_inserts_each_get_their_answer,
    insert_many,
    insert_and_lease_in_one_go,
    lease_order_priority_then_run_at,
    pinned_jobs_only_for_their_instance,
    future_jobs_wait_and_report_next_due,
    concurrency_budget,
    a_lease_says_whether_it_drained_the_queue,
    rpm_budget,
    tpm_budget,
    cooldown_blocks,
    breaker_opens_and_success_resets,
    finish_succeed_and_fail,
    finish_requeue_hop_and_retry,
    stale_finish_is_refused,
    concurrent_finishes_each_get_their_answer,
    renew_lease_only_for_owner,
    cancel_queued_running_and_finished,
    rescue_scopes,
    rescue_fails_orphaned_streams,
    release_gives_back_hop_tries,
    queued_jobs_move_to_another_hop,
    queued_jobs_fail_in_place,
    depths_and_running_counts,
    finished_jobs_paging,
    metrics_bookkeeping,
    purge_finished_jobs,
    heartbeats_and_instances,
);

/// Not in `conformance!`: on Postgres the test needs its database (see `HeldAttempts`).
mod grouped_ends {
    use super::*;

    #[tokio::test]
    async fn sqlite() {
        let (store, _backing) = sqlite_store().await;
        grouped_ends_match_one_by_one(store, None).await;
    }

    #[tokio::test]
    async fn postgres() {
        let (store, backing) = postgres_store().await;
        let Backing::Postgres(db) = &backing else {
            unreachable!("a Postgres store has a Postgres backing")
        };
        grouped_ends_match_one_by_one(store, Some(&db.url)).await;
    }
}

fn budget(rpm: u32, concurrency: u32, tpm: Option<u32>) -> Budget {
    Budget {
        rpm,
        concurrency,
        tpm,
    }
}

const ROOMY: Budget = Budget {
    rpm: 1000,
    concurrency: 100,
    tpm: None,
};

fn lease_req(provider: &str, instance: &str, max_jobs: u32, budget: Budget) -> LeaseRequest {
    LeaseRequest {
        provider: provider.into(),
        model: format!("m-{provider}"),
        instance: instance.into(),
        lease_ms: 60_000,
        max_jobs,
        budget,
    }
}

async fn insert(store: &Store, new: NewJob) {
    assert!(matches!(
        store.insert_job(&new).await.unwrap(),
        Inserted::New
    ));
}

async fn lease_ids(store: &Store, req: &LeaseRequest) -> Vec<String> {
    let lease = store.lease(req).await.unwrap();
    lease.jobs.into_iter().map(|l| l.job.id).collect()
}

async fn lease_one(store: &Store, provider: &str, instance: &str) -> LeasedJob {
    let mut lease = store
        .lease(&lease_req(provider, instance, 1, ROOMY))
        .await
        .unwrap();
    assert_eq!(lease.jobs.len(), 1, "expected one job: {lease:?}");
    lease.jobs.remove(0)
}

fn finish(
    leased: &LeasedJob,
    instance: &str,
    outcome: AttemptOutcome,
    transition: Transition,
) -> AttemptFinish {
    AttemptFinish {
        job_id: leased.job.id.clone(),
        attempt_n: leased.attempt_n,
        instance: instance.into(),
        provider: leased.job.provider.clone(),
        finished_at: leased.job.started_at.unwrap_or(0) + 5,
        outcome,
        status_code: Some(200),
        error: None,
        tokens: Some(10),
        count_tokens: false,
        transition,
        effect: ProviderEffect::default(),
    }
}

fn succeed() -> Transition {
    Transition::Succeed {
        result: r#"{"ok":true}"#.into(),
        usage_prompt: Some(7),
        usage_completion: Some(3),
    }
}

fn job_error(status: u16) -> JobError {
    JobError {
        status,
        kind: "provider_server_error".into(),
        message: "upstream broke".into(),
        code: Some("x".into()),
        param: None,
        retry_after: None,
    }
}

async fn get(store: &Store, id: &str) -> Job {
    store.get_job(id).await.unwrap().expect("job exists")
}

async fn insert_and_get(store: Store) {
    let now = store.now_ms().await.unwrap();
    let mut new = job("j1", &["a", "b"], now);
    new.hop = 1;
    new.batch_id = Some("batch_1".into());
    new.custom_id = Some("line-1".into());
    insert(&store, new).await;
    let j = get(&store, "j1").await;
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!(j.chain, vec!["a", "b"]);
    assert_eq!((j.hop, j.hops, j.provider.as_str()), (1, 0, "b"));
    assert_eq!(j.request, REQUEST);
    assert_eq!((j.run_at, j.created_at), (now, now));
    assert_eq!(j.deadline_at, now + 600_000);
    assert_eq!(j.caller, None);
    assert_eq!(j.batch_id.as_deref(), Some("batch_1"));
    assert_eq!(j.custom_id.as_deref(), Some("line-1"));
    assert_eq!((j.attempt_count, j.hop_tries), (0, 0));
    assert!(j.lease_owner.is_none() && j.finished_at.is_none() && j.result.is_none());
    assert!(store.get_attempts("j1").await.unwrap().is_empty());
    assert!(store.get_job("nope").await.unwrap().is_none());
    store.ping().await.unwrap();
}

async fn idempotent_insert(store: Store) {
    let now = store.now_ms().await.unwrap();
    let keyed = |id: &str, caller: Option<&str>| NewJob {
        caller: caller.map(str::to_string),
        idempotency_key: Some("k1".into()),
        ..job(id, &["a"], now)
    };
    insert(&store, keyed("first", Some("alice"))).await;
    match store
        .insert_job(&keyed("again", Some("alice")))
        .await
        .unwrap()
    {
        Inserted::Existing(j) => assert_eq!(j.id, "first"),
        Inserted::New => panic!("a repeated key must return the first job"),
    }
    assert!(store.get_job("again").await.unwrap().is_none());
    // Another caller's key is another key; anonymous callers share the '' caller.
    insert(&store, keyed("bob", Some("bob"))).await;
    insert(&store, keyed("anon1", None)).await;
    match store.insert_job(&keyed("anon2", None)).await.unwrap() {
        Inserted::Existing(j) => {
            assert_eq!(j.id, "anon1");
            assert_eq!(j.caller, None);
        }
        Inserted::New => panic!("anonymous repeats share one key space"),
    }
    // Without a key nothing is deduplicated.
    insert(&store, job("free1", &["a"], now)).await;
    insert(&store, job("free2", &["a"], now)).await;
    let depth = store.queue_depths().await.unwrap();
    assert_eq!(depth, vec![("a".to_string(), 5)]);
}

/// Inserts that arrive together (Postgres writes them as one group, SQLite in one
/// transaction) each get their own answer, repeated keys within the group included.
async fn concurrent_inserts_each_get_their_answer(store: Store) {
    let now = store.now_ms().await.unwrap();
    let jobs: Vec<NewJob> = (0..40)
        .map(|i| NewJob {
            // Jobs 0..10 share five keys in pairs; the rest have none.
            idempotency_key: (i < 10).then(|| format!("k{}", i % 5)),
            caller: Some("alice".into()),
            request: format!(r#"{{"messages":[{{"role":"user","content":"{i}"}}]}}"#),
            ..job(&format!("c{i}"), &["a"], now)
        })
        .collect();
    let answers = futures::future::join_all(jobs.iter().map(|j| store.insert_job(j))).await;
    let mut first_of_key = std::collections::HashMap::new();
    for (j, answer) in jobs.iter().zip(&answers) {
        if let (Inserted::New, Some(k)) = (answer.as_ref().unwrap(), &j.idempotency_key) {
            assert!(
                first_of_key.insert(k.clone(), j.id.clone()).is_none(),
                "{k} inserted twice"
            );
        }
    }
    assert_eq!(first_of_key.len(), 5);
    for (j, answer) in jobs.iter().zip(answers) {
        match (answer.unwrap(), &j.idempotency_key) {
            (Inserted::New, _) => assert_eq!(get(&store, &j.id).await.request, j.request),
            (Inserted::Existing(first), Some(k)) => {
                assert_eq!(first.id, first_of_key[k]);
                assert!(store.get_job(&j.id).await.unwrap().is_none());
            }
            (Inserted::Existing(_), None) => panic!("{} has no key to repeat", j.id),
        }
    }
    assert_eq!(
        store.queue_depths().await.unwrap(),
        vec![("a".to_string(), 35)]
    );
}

/// Accept-and-lease: the lease is the ordinary one (older work first, budgets hold), and
/// a repeated idempotency key leases nothing.
async fn insert_and_lease_in_one_go(store: Store) {
    let now = store.now_ms().await.unwrap();
    let req = lease_req("a", "i1", 1, budget(1000, 2, None));
    let (inserted, lease) = store
        .insert_and_lease(&job("new1", &["a"], now), &req)
        .await
        .unwrap();
    assert!(matches!(inserted, Inserted::New));
    assert_eq!(lease.jobs.len(), 1);
    let first = &lease.jobs[0];
    assert_eq!(first.job.id, "new1");
    assert_eq!(first.job.status, JobStatus::Running);
    assert_eq!(first.attempt_n, 1);
    assert_eq!(get(&store, "new1").await.lease_owner.as_deref(), Some("i1"));
    assert_eq!(store.get_attempts("new1").await.unwrap().len(), 1);

    // An older job waits: the lease takes it, and the new one stays queued.
    insert(&store, job("old", &["a"], now - 1_000)).await;
    let (_, lease) = store
        .insert_and_lease(&job("new2", &["a"], now), &req)
        .await
        .unwrap();
    let ids: Vec<_> = lease.jobs.iter().map(|l| l.job.id.as_str()).collect();
    assert_eq!(ids, vec!["old"]);
    assert_eq!(get(&store, "new2").await.status, JobStatus::Queued);

    // Concurrency 2 is used up: the insert holds, the lease says why it took nothing.
    let (inserted, lease) = store
        .insert_and_lease(&job("new3", &["a"], now), &req)
        .await
        .unwrap();
    assert!(matches!(inserted, Inserted::New));
    assert!(lease.jobs.is_empty());
    assert_eq!(lease.blocked, Some(Blocked::Concurrency));
    assert_eq!(get(&store, "new3").await.status, JobStatus::Queued);

    // A repeat of an idempotent request returns the first job and leases nothing.
    let keyed = |id: &str| NewJob {
        idempotency_key: Some("k".into()),
        ..job(id, &["b"], now)
    };
    insert(&store, keyed("k1")).await;
    let (inserted, lease) = store
        .insert_and_lease(&keyed("k2"), &lease_req("b", "i1", 1, ROOMY))
        .await
        .unwrap();
    assert!(matches!(inserted, Inserted::Existing(j) if j.id == "k1"));
    assert!(lease.jobs.is_empty());
    assert_eq!(get(&store, "k1").await.status, JobStatus::Queued);
}

async fn insert_many(store: Store) {
    let now = store.now_ms().await.unwrap();
    let jobs: Vec<NewJob> = (0..5)
        .map(|i| NewJob {
            priority: PRIORITY_BATCH,
            batch_id: Some("b1".into()),
            custom_id: Some(format!("line-{i}")),
            ..job(
                &format!("line{i}"),
                if i % 2 == 0 { &["a"] } else { &["b"] },
                now,
            )
        })
        .collect();
    // A line refused for its request is inserted failed, in the same transaction.
    let refused = JobError {
        status: 400,
        kind: "invalid_request_error".into(),
        message: "`messages` is required".into(),
        code: None,
        param: Some("messages".into()),
        retry_after: None,
    };
    let mut with_refused = jobs.clone();
    with_refused.push(NewJob {
        batch_id: Some("b1".into()),
        ..job("refused", &["a"], now - 5)
    });
    // A refusal that names no inserted job is a bug: nothing is kept.
    let stray = [("nowhere".to_string(), refused.clone())];
    assert!(store.insert_jobs(&with_refused, &stray).await.is_err());
    assert!(store.get_job("line0").await.unwrap().is_none());
    assert!(store.insert_jobs(&[], &stray).await.is_err());
    store
        .insert_jobs(&with_refused, &[("refused".to_string(), refused.clone())])
        .await
        .unwrap();
    store.insert_jobs(&[], &[]).await.unwrap();
    let j = get(&store, "line3").await;
    assert_eq!(j.priority, PRIORITY_BATCH);
    assert_eq!(j.provider, "b");
    assert_eq!(j.custom_id.as_deref(), Some("line-3"));
    let r = get(&store, "refused").await;
    assert_eq!(r.status, JobStatus::Failed);
    assert_eq!(r.status_code, Some(400));
    assert_eq!(r.error.as_ref(), Some(&refused));
    assert_eq!(r.finished_at, Some(now - 5));
    let mut depth = store.queue_depths().await.unwrap();
    depth.sort();
    assert_eq!(depth, vec![("a".into(), 3), ("b".into(), 2)]);
}

async fn lease_order_priority_then_run_at(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(
        &store,
        NewJob {
            priority: PRIORITY_BATCH,
            ..job("batch_oldest", &["a"], now - 3000)
        },
    )
    .await;
    insert(&store, job("newer", &["a"], now - 1000)).await;
    insert(&store, job("older", &["a"], now - 2000)).await;
    insert(&store, job("other_provider", &["b"], now - 5000)).await;

    let lease = store.lease(&lease_req("a", "i1", 2, ROOMY)).await.unwrap();
    let ids: Vec<&str> = lease.jobs.iter().map(|l| l.job.id.as_str()).collect();
    assert_eq!(ids, vec!["older", "newer"]);
    assert!(lease.blocked.is_none());
    let leased = &lease.jobs[0];
    assert_eq!(leased.attempt_n, 1);
    assert_eq!(leased.job.status, JobStatus::Running);
    assert_eq!(leased.job.lease_owner.as_deref(), Some("i1"));
    // What the lease returned is what it wrote.
    let stored = get(&store, "older").await;
    assert_eq!(&stored, &leased.job);
    assert_eq!((stored.attempt_count, stored.hop_tries), (1, 1));
    let started = stored.started_at.expect("started_at set");
    assert!(stored.lease_expires_at.expect("lease set") >= started + 60_000);
    let attempts = store.get_attempts("older").await.unwrap();
    assert_eq!(attempts.len(), 1);
    let a = &attempts[0];
    assert_eq!((a.n, a.outcome.as_str()), (1, "running"));
    assert_eq!((a.provider.as_str(), a.model.as_str()), ("a", "m-a"));
    assert_eq!(a.instance, "i1");
    assert_eq!(a.started_at, started);
    assert!(a.finished_at.is_none());

    assert_eq!(
        lease_ids(&store, &lease_req("a", "i1", 5, ROOMY)).await,
        vec!["batch_oldest"]
    );
    let empty = store.lease(&lease_req("a", "i1", 5, ROOMY)).await.unwrap();
    assert!(empty.jobs.is_empty() && empty.blocked.is_none() && empty.next_due_at.is_none());
}

async fn pinned_jobs_only_for_their_instance(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(
        &store,
        NewJob {
            stream: true,
            pinned_instance: Some("holder".into()),
            ..job("s1", &["a"], now)
        },
    )
    .await;
    let other = store
        .lease(&lease_req("a", "other", 5, ROOMY))
        .await
        .unwrap();
    assert!(other.jobs.is_empty());
    assert_eq!(
        other.next_due_at, None,
        "another instance's stream is not due for us"
    );
    let mine = lease_ids(&store, &lease_req("a", "holder", 5, ROOMY)).await;
    assert_eq!(mine, vec!["s1"]);
    assert!(get(&store, "s1").await.stream);
}

async fn future_jobs_wait_and_report_next_due(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("later", &["a"], now + 60_000)).await;
    insert(&store, job("latest", &["a"], now + 90_000)).await;
    let lease = store.lease(&lease_req("a", "i1", 5, ROOMY)).await.unwrap();
    assert!(lease.jobs.is_empty());
    assert!(lease.blocked.is_none());
    assert_eq!(lease.next_due_at, Some(now + 60_000));
}

async fn concurrency_budget(store: Store) {
    let now = store.now_ms().await.unwrap();
    for i in 0..3 {
        insert(&store, job(&format!("c{i}"), &["a"], now - 100 + i)).await;
    }
    let b = budget(1000, 2, None);
    let first = store.lease(&lease_req("a", "i1", 5, b)).await.unwrap();
    assert_eq!(first.jobs.len(), 2);
    // The budget is global: another instance sees the same slots taken.
    let blocked = store.lease(&lease_req("a", "i2", 5, b)).await.unwrap();
    assert!(blocked.jobs.is_empty());
    assert_eq!(blocked.blocked, Some(Blocked::Concurrency));
    let done = finish(&first.jobs[0], "i1", AttemptOutcome::Ok, succeed());
    assert!(store.finish_attempt(&done).await.unwrap());
    assert_eq!(
        lease_ids(&store, &lease_req("a", "i2", 5, b)).await,
        vec!["c2"]
    );
}

/// `drained`: the lease took every due job, fewer than it could have (the pool then waits
/// for new work instead of leasing again at once).
async fn a_lease_says_whether_it_drained_the_queue(store: Store) {
    let now = store.now_ms().await.unwrap();
    for i in 0..5 {
        insert(&store, job(&format!("d{i}"), &["a"], now - 100 + i)).await;
    }
    // Queued for later: not due, so not counted as work left.
    insert(&store, job("later", &["a"], now + 60_000)).await;
    // As many as asked for: more may wait.
    let full = store.lease(&lease_req("a", "i1", 2, ROOMY)).await.unwrap();
    assert_eq!(full.jobs.len(), 2);
    assert!(!full.drained);
    // The budget stopped it, not the queue.
    let capped = store
        .lease(&lease_req("a", "i1", 5, budget(1000, 3, None)))
        .await
        .unwrap();
    assert_eq!(capped.jobs.len(), 1);
    assert!(!capped.drained);
    let rest = store.lease(&lease_req("a", "i1", 5, ROOMY)).await.unwrap();
    assert_eq!(rest.jobs.len(), 2);
    assert!(rest.drained);
    let none = store.lease(&lease_req("a", "i1", 5, ROOMY)).await.unwrap();
    assert!(none.jobs.is_empty());
    assert_eq!(none.next_due_at, Some(now + 60_000));
}

async fn rpm_budget(store: Store) {
    let now = store.now_ms().await.unwrap();
    for i in 0..3 {
        insert(&store, job(&format!("r{i}"), &["a"], now - 100 + i)).await;
    }
    let b = budget(2, 100, None);
    let lease = store.lease(&lease_req("a", "i1", 5, b)).await.unwrap();
    assert_eq!(lease.jobs.len(), 2, "rpm caps one lease too");
    let first_start = lease.jobs[0].job.started_at.unwrap();
    for l in &lease.jobs {
        assert!(
            store
                .finish_attempt(&finish(l, "i1", AttemptOutcome::Ok, succeed()))
                .await
                .unwrap()
        );
    }
    // Finished calls still count: rpm counts call starts in the window, per second bucket,
    // until the whole second of the first start has left it.
    let blocked = store.lease(&lease_req("a", "i2", 5, b)).await.unwrap();
    assert!(blocked.jobs.is_empty());
    let frees_at = (llm_orch::queue::budget::second_of(first_start) + 1) * 1000
        + llm_orch::queue::RATE_WINDOW_MS;
    assert_eq!(blocked.blocked, Some(Blocked::Rpm(frees_at)));
    assert!(frees_at >= first_start + 60_000);
}

async fn tpm_budget(store: Store) {
    let now = store.now_ms().await.unwrap();
    // Each request is estimated at len/4 + max_tokens tokens.
    let estimate = (REQUEST.len() as i64) / 4 + 10;
    let tpm = u32::try_from(estimate * 3 / 2).unwrap();
    for i in 0..4 {
        insert(&store, job(&format!("t{i}"), &["a"], now - 100 + i)).await;
    }
    let b = budget(1000, 100, Some(tpm));
    // The first call of a lease always goes; the second would pass the budget.
    assert_eq!(
        lease_ids(&store, &lease_req("a", "i1", 5, b)).await,
        vec!["t0"]
    );
    let attempts = store.get_attempts("t0").await.unwrap();
    assert_eq!(attempts[0].tokens, estimate);
    // Used tokens are below the budget: one more call starts.
    assert_eq!(
        lease_ids(&store, &lease_req("a", "i2", 5, b)).await,
        vec!["t1"]
    );
    let blocked = store.lease(&lease_req("a", "i1", 5, b)).await.unwrap();
    assert!(matches!(blocked.blocked, Some(Blocked::Tpm(t)) if t > now + 59_000));
    // Without tpm, estimates are not recorded.
    assert_eq!(
        lease_ids(&store, &lease_req("a", "i1", 1, budget(1000, 100, None))).await,
        vec!["t2"]
    );
    assert_eq!(store.get_attempts("t2").await.unwrap()[0].tokens, 0);
}

async fn cooldown_blocks(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("x", &["a"], now - 10)).await;
    insert(&store, job("y", &["a"], now - 5)).await;
    let leased = lease_one(&store, "a", "i1").await;
    let until = now + 60_000;
    let mut fin = finish(
        &leased,
        "i1",
        AttemptOutcome::Cooldown,
        Transition::Requeue {
            hop: 0,
            provider: "a".into(),
            run_at: until,
        },
    );
    fin.status_code = Some(429);
    fin.effect.cooldown_until = Some(until);
    assert!(store.finish_attempt(&fin).await.unwrap());
    let lease = store.lease(&lease_req("a", "i2", 5, ROOMY)).await.unwrap();
    assert!(lease.jobs.is_empty());
    assert_eq!(lease.blocked, Some(Blocked::Cooldown(until)));
    // A cool-down only ever extends.
    let second = NewJob {
        ..job("z", &["b"], now)
    };
    insert(&store, second).await;
    let other = lease_one(&store, "b", "i1").await;
    let mut shorter = finish(&other, "i1", AttemptOutcome::Ok, succeed());
    shorter.provider = "a".into();
    shorter.effect.cooldown_until = Some(now + 1000);
    assert!(store.finish_attempt(&shorter).await.unwrap());
    let states = store.provider_states().await.unwrap();
    let a = states
        .iter()
        .find(|s| s.provider == "a")
        .expect("state of a");
    assert_eq!(a.cooldown_until, until);
}

async fn breaker_opens_and_success_resets(store: Store) {
    let now = store.now_ms().await.unwrap();
    for i in 0..4 {
        insert(&store, job(&format!("f{i}"), &["a"], now - 100 + i)).await;
    }
    let fail = |leased: &LeasedJob| {
        let mut f = finish(
            leased,
            "i1",
            AttemptOutcome::Retry,
            Transition::Requeue {
                hop: 0,
                provider: "a".into(),
                run_at: now,
            },
        );
        f.status_code = Some(500);
        f.effect.success = Some(false);
        f.effect.breaker = Some((2, 30_000));
        f
    };
    let l = lease_one(&store, "a", "i1").await;
    assert!(store.finish_attempt(&fail(&l)).await.unwrap());
    // One failure: the breaker stays closed, success resets the count.
    let l = lease_one(&store, "a", "i1").await;
    let mut ok = finish(&l, "i1", AttemptOutcome::Ok, succeed());
    ok.effect.success = Some(true);
    assert!(store.finish_attempt(&ok).await.unwrap());
    let states = store.provider_states().await.unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].consecutive_failures, 0);
    assert_eq!(states[0].breaker_open_until, 0);
    // Two in a row open it.
    for _ in 0..2 {
        let l = lease_one(&store, "a", "i1").await;
        assert!(store.finish_attempt(&fail(&l)).await.unwrap());
    }
    let after = store.now_ms().await.unwrap();
    let lease = store.lease(&lease_req("a", "i2", 5, ROOMY)).await.unwrap();
    assert!(lease.jobs.is_empty());
    match lease.blocked {
        Some(Blocked::Breaker(t)) => {
            assert!(t > after + 25_000 && t <= after + 30_010, "{t} vs {after}")
        }
        other => panic!("expected the breaker, got {other:?}"),
    }
    let states = store.provider_states().await.unwrap();
    assert_eq!(states[0].consecutive_failures, 2);
}

async fn finish_succeed_and_fail(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("ok", &["a"], now - 10)).await;
    insert(&store, job("bad", &["a"], now - 5)).await;
    let l = lease_one(&store, "a", "i1").await;
    let fin = finish(&l, "i1", AttemptOutcome::Ok, succeed());
    assert!(store.finish_attempt(&fin).await.unwrap());
    let j = get(&store, "ok").await;
    assert_eq!(j.status, JobStatus::Succeeded);
    assert_eq!(j.status_code, Some(200));
    assert_eq!(j.result.as_deref(), Some(r#"{"ok":true}"#));
    assert_eq!((j.usage_prompt, j.usage_completion), (Some(7), Some(3)));
    assert_eq!(j.finished_at, Some(fin.finished_at));
    assert_eq!(j.finished_by.as_deref(), Some("i1"));
    assert!(j.lease_owner.is_none() && j.lease_expires_at.is_none());
    let a = &store.get_attempts("ok").await.unwrap()[0];
    assert_eq!(
        (a.outcome.as_str(), a.status_code, a.tokens),
        ("ok", Some(200), 10)
    );
    assert_eq!(a.finished_at, Some(fin.finished_at));

    let l = lease_one(&store, "a", "i1").await;
    let mut fin = finish(
        &l,
        "i1",
        AttemptOutcome::Failed,
        Transition::Fail {
            error: job_error(502),
            partial: Some("partial".into()),
        },
    );
    fin.status_code = Some(503);
    fin.error = Some("HTTP 503".into());
    fin.tokens = None;
    assert!(store.finish_attempt(&fin).await.unwrap());
    let j = get(&store, "bad").await;
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.status_code, Some(502));
    assert_eq!(j.error, Some(job_error(502)));
    assert_eq!(j.result.as_deref(), Some("partial"));
    let a = &store.get_attempts("bad").await.unwrap()[0];
    assert_eq!((a.outcome.as_str(), a.status_code), ("failed", Some(503)));
    assert_eq!(a.error.as_deref(), Some("HTTP 503"));
    assert_eq!(a.tokens, 0, "no usage keeps the lease's estimate");
}

async fn finish_requeue_hop_and_retry(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("h", &["a", "b"], now - 10)).await;
    let l = lease_one(&store, "a", "i1").await;
    let hop = Transition::Requeue {
        hop: 1,
        provider: "b".into(),
        run_at: now,
    };
    assert!(
        store
            .finish_attempt(&finish(&l, "i1", AttemptOutcome::Hop, hop))
            .await
            .unwrap()
    );
    let j = get(&store, "h").await;
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!((j.hop, j.provider.as_str(), j.hops), (1, "b", 1));
    assert_eq!((j.hop_tries, j.attempt_count), (0, 1));
    assert!(j.lease_owner.is_none());
    assert!(
        store
            .lease(&lease_req("a", "i1", 5, ROOMY))
            .await
            .unwrap()
            .jobs
            .is_empty()
    );

    let l = lease_one(&store, "b", "i2").await;
    assert_eq!(l.attempt_n, 2);
    assert_eq!((l.job.hop_tries, l.job.attempt_count), (1, 2));
    // A retry on the same provider: later, same hop, tries kept, no hop counted.
    let retry = Transition::Requeue {
        hop: 1,
        provider: "b".into(),
        run_at: now + 50_000,
    };
    assert!(
        store
            .finish_attempt(&finish(&l, "i2", AttemptOutcome::Retry, retry))
            .await
            .unwrap()
    );
    let j = get(&store, "h").await;
    assert_eq!(
        (j.hop, j.hops, j.hop_tries, j.run_at),
        (1, 1, 1, now + 50_000)
    );
    let outcomes: Vec<String> = store
        .get_attempts("h")
        .await
        .unwrap()
        .into_iter()
        .map(|a| format!("{}:{}:{}", a.n, a.provider, a.outcome))
        .collect();
    assert_eq!(outcomes, vec!["1:a:hop", "2:b:retry"]);
}

async fn stale_finish_is_refused(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("s", &["a"], now - 10)).await;
    let l = lease_one(&store, "a", "owner").await;
    let stale = finish(&l, "intruder", AttemptOutcome::Ok, succeed());
    assert!(!store.finish_attempt(&stale).await.unwrap());
    let j = get(&store, "s").await;
    assert_eq!(j.status, JobStatus::Running);
    assert_eq!(j.lease_owner.as_deref(), Some("owner"));
    assert!(j.result.is_none());
    // The same instance finishing an older attempt (its lease was lost, the job leased
    // again) is refused too.
    let mut older = finish(&l, "owner", AttemptOutcome::Ok, succeed());
    older.attempt_n -= 1;
    assert!(!store.finish_attempt(&older).await.unwrap());
    assert_eq!(get(&store, "s").await.status, JobStatus::Running);
    // The owner still can.
    assert!(
        store
            .finish_attempt(&finish(&l, "owner", AttemptOutcome::Ok, succeed()))
            .await
            .unwrap()
    );
    // And a second finish of a finished job is stale too.
    assert!(
        !store
            .finish_attempt(&finish(&l, "owner", AttemptOutcome::Ok, succeed()))
            .await
            .unwrap()
    );
}

/// Attempts that end together (Postgres writes them as one group) each get their own
/// outcome written and answered: successes, failures, hops and a stale finish mixed.
async fn concurrent_finishes_each_get_their_answer(store: Store) {
    let now = store.now_ms().await.unwrap();
    for i in 0..12 {
        insert(&store, job(&format!("f{i}"), &["a", "b"], now - 100 + i)).await;
    }
    let mut leased = store
        .lease(&lease_req("a", "i1", 12, ROOMY))
        .await
        .unwrap()
        .jobs;
    assert_eq!(leased.len(), 12);
    leased.sort_by(|x, y| x.job.id.cmp(&y.job.id));
    let fins: Vec<(String, AttemptFinish)> = leased
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let fin = match i % 4 {
                0 => finish(
                    l,
                    "i1",
                    AttemptOutcome::Ok,
                    Transition::Succeed {
                        result: format!(r#"{{"n":{i}}}"#),
                        usage_prompt: Some(i as i64),
                        usage_completion: Some(1),
                    },
                ),
                1 => finish(
                    l,
                    "i1",
                    AttemptOutcome::Failed,
                    Transition::Fail {
                        error: job_error(400 + i as u16),
                        partial: None,
                    },
                ),
                2 => finish(
                    l,
                    "i1",
                    AttemptOutcome::Hop,
                    Transition::Requeue {
                        hop: 1,
                        provider: "b".into(),
                        run_at: now,
                    },
                ),
                // Not the lease holder: refused, the job keeps running.
                _ => finish(l, "intruder", AttemptOutcome::Ok, succeed()),
            };
            (l.job.id.clone(), fin)
        })
        .collect();
    let answers =
        futures::future::join_all(fins.iter().map(|(_, f)| store.finish_attempt(f))).await;
    for (i, ((id, _), answer)) in fins.iter().zip(answers).enumerate() {
        let j = get(&store, id).await;
        match i % 4 {
            0 => {
                assert!(answer.unwrap());
                assert_eq!(j.status, JobStatus::Succeeded);
                assert_eq!(
                    j.result.as_deref(),
                    Some(format!(r#"{{"n":{i}}}"#).as_str())
                );
                assert_eq!(j.usage_prompt, Some(i as i64));
            }
            1 => {
                assert!(answer.unwrap());
                assert_eq!(j.status, JobStatus::Failed);
                assert_eq!(j.status_code, Some(400 + i as i64));
            }
            2 => {
                assert!(answer.unwrap());
                assert_eq!(j.status, JobStatus::Queued);
                assert_eq!((j.hop, j.provider.as_str()), (1, "b"));
            }
            _ => {
                assert!(!answer.unwrap());
                assert_eq!(j.status, JobStatus::Running);
            }
        }
    }
}

/// Ends of several kinds and providers that arrive together (both stores write them as
/// one group): plain successes (nothing to book, no provider state to change), successes
/// that reset or extend a provider's state, a failure, the same job twice and a stale end.
/// Each must come out as if written alone, in the order given; any store that writes a
/// group set-wise has to keep to that.
///
/// `postgres`: the store's database. Postgres runs two groups at once, and the first
/// writes to arrive go out alone; had one of them ended before the others arrived (its
/// thread preempted while the server answered), the next writes would go out alone too,
/// in parallel and in no order. Holding the rows those first writes need keeps them from
/// ending until all have arrived, so the rest form one group as they do under load.
async fn grouped_ends_match_one_by_one(store: Store, postgres: Option<&str>) {
    let now = store.now_ms().await.unwrap();
    for (p, n) in [("a", 3), ("b", 3), ("c", 1), ("d", 1)] {
        for i in 0..n {
            insert(&store, job(&format!("{p}{i}"), &[p], now - 100 + i)).await;
        }
    }
    // Provider c has one failure counted: a success there must reset it.
    let c0 = lease_one(&store, "c", "i1").await;
    let mut failed = finish(
        &c0,
        "i1",
        AttemptOutcome::Retry,
        Transition::Requeue {
            hop: 0,
            provider: "c".into(),
            run_at: now,
        },
    );
    failed.effect.success = Some(false);
    failed.effect.breaker = Some((5, 1_000));
    assert!(store.finish_attempt(&failed).await.unwrap());
    // Provider b has a state with no failures: a success alone would change nothing, but
    // the one below follows b's failure in the same group and must reset it.
    let b0 = lease_one(&store, "b", "i1").await;
    let mut b_first = finish(&b0, "i1", AttemptOutcome::Ok, succeed());
    b_first.effect.success = Some(true);
    assert!(store.finish_attempt(&b_first).await.unwrap());
    let mut leased = Vec::new();
    for (p, n) in [("a", 3), ("b", 2), ("c", 1), ("d", 1)] {
        let lease = store.lease(&lease_req(p, "i1", n, ROOMY)).await.unwrap();
        assert_eq!(lease.jobs.len(), n as usize, "{p}: {lease:?}");
        leased.extend(lease.jobs);
    }
    leased.sort_by(|x, y| x.job.id.cmp(&y.job.id));
    let by_id = |id: &str| leased.iter().find(|l| l.job.id == id).unwrap();
    let ok = |id: &str, instance: &str| {
        let mut f = finish(by_id(id), instance, AttemptOutcome::Ok, succeed());
        f.transition = Transition::Succeed {
            result: format!(r#"{{"id":"{id}"}}"#),
            usage_prompt: Some(1),
            usage_completion: Some(2),
        };
        f
    };
    let mut b_fail = finish(
        by_id("b1"),
        "i1",
        AttemptOutcome::Failed,
        Transition::Fail {
            error: job_error(500),
            partial: None,
        },
    );
    b_fail.effect.success = Some(false);
    b_fail.effect.breaker = Some((5, 1_000));
    let mut b_ok = ok("b2", "i1");
    b_ok.effect.success = Some(true);
    let mut c_ok = ok("c0", "i1");
    c_ok.effect.success = Some(true);
    let mut d_cool = ok("d0", "i1");
    d_cool.effect.cooldown_until = Some(now + 60_000);
    let fins = [
        (ok("a0", "i1"), true),
        // The same job twice: its holder's end counts, the stale one is refused.
        (ok("a1", "intruder"), false),
        (ok("a1", "i1"), true),
        (ok("a2", "intruder"), false),
        (b_fail, true),
        (b_ok, true),
        (c_ok, true),
        (d_cool, true),
    ];
    let held = match postgres {
        Some(url) => Some(HeldAttempts::lock(url, &["a0", "a1"]).await),
        None => None,
    };
    // The ends all arrive in the first poll, before the rows are let go.
    let (answers, ()) = futures::join!(
        futures::future::join_all(fins.iter().map(|(f, _)| store.finish_attempt(f))),
        async {
            if let Some(held) = held {
                held.release().await;
            }
        }
    );
    for ((fin, expected), answer) in fins.iter().zip(answers) {
        assert_eq!(
            answer.unwrap(),
            *expected,
            "{} by {}",
            fin.job_id,
            fin.instance
        );
    }
    for id in ["a0", "a1", "b2", "c0", "d0"] {
        let j = get(&store, id).await;
        assert_eq!(j.status, JobStatus::Succeeded, "{id}");
        assert_eq!(j.result, Some(format!(r#"{{"id":"{id}"}}"#)), "{id}");
        assert_eq!((j.usage_prompt, j.usage_completion), (Some(1), Some(2)));
        assert_eq!(j.finished_by.as_deref(), Some("i1"));
        let attempt = store.get_attempts(id).await.unwrap().pop().unwrap();
        assert_eq!(attempt.outcome, "ok", "{id}");
        assert_eq!(attempt.status_code, Some(200));
        assert!(attempt.finished_at.is_some());
    }
    let a2 = get(&store, "a2").await;
    assert_eq!(a2.status, JobStatus::Running);
    assert_eq!(a2.lease_owner.as_deref(), Some("i1"));
    assert_eq!(get(&store, "b1").await.status, JobStatus::Failed);
    let states = store.provider_states().await.unwrap();
    let state = |p: &str| states.iter().find(|s| s.provider == p);
    // The success on c reset its failure; the one on b came after b's failure and so
    // reset it too; the cool-down on d was written.
    assert_eq!(state("c").expect("state of c").consecutive_failures, 0);
    assert_eq!(state("b").expect("state of b").consecutive_failures, 0);
    assert_eq!(state("d").expect("state of d").cooldown_until, now + 60_000);
    assert!(state("a").is_none(), "{states:?}");
}

/// Attempt rows locked by a transaction on a connection of the test's own, so that ends
/// written to them wait until `release`.
struct HeldAttempts(sqlx::PgConnection);

impl HeldAttempts {
    async fn lock(url: &str, job_ids: &[&str]) -> Self {
        use sqlx::{Connection, Executor};
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        conn.execute("BEGIN").await.unwrap();
        let ids: Vec<String> = job_ids.iter().map(|s| s.to_string()).collect();
        let locked = sqlx::query("SELECT 1 FROM attempts WHERE job_id = ANY($1) FOR UPDATE")
            .bind(&ids)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(locked.len(), job_ids.len(), "one running attempt each");
        Self(conn)
    }

    async fn release(mut self) {
        use sqlx::{Connection, Executor};
        self.0.execute("COMMIT").await.unwrap();
        self.0.close().await.unwrap();
    }
}

async fn renew_lease_only_for_owner(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("r", &["a"], now - 10)).await;
    let mut req = lease_req("a", "i1", 1, ROOMY);
    req.lease_ms = 1_000;
    let l = store.lease(&req).await.unwrap().jobs.remove(0);
    let before = l.job.lease_expires_at.unwrap();
    assert!(store.renew_lease("r", "i1", 1, 120_000).await.unwrap());
    let after = get(&store, "r").await.lease_expires_at.unwrap();
    assert!(after >= before + 100_000, "{before} → {after}");
    assert!(!store.renew_lease("r", "i2", 1, 120_000).await.unwrap());
    assert!(
        !store
            .renew_lease("missing", "i1", 1, 120_000)
            .await
            .unwrap()
    );
    // Another attempt number is not this lease.
    assert!(!store.renew_lease("r", "i1", 2, 120_000).await.unwrap());
    assert!(
        store
            .finish_attempt(&finish(&l, "i1", AttemptOutcome::Ok, succeed()))
            .await
            .unwrap()
    );
    assert!(!store.renew_lease("r", "i1", 1, 120_000).await.unwrap());
}

async fn cancel_queued_running_and_finished(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("run", &["a"], now - 10)).await;
    insert(&store, job("queued", &["a"], now)).await;
    let l = lease_one(&store, "a", "i1").await;
    assert_eq!(l.job.id, "run");

    let j = store.cancel_job("queued").await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    assert_eq!(j.status_code, Some(499));
    assert_eq!(j.error.as_ref().map(|e| e.kind.as_str()), Some("cancelled"));
    assert!(j.finished_at.is_some());

    let j = store.cancel_job("run").await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    assert!(j.lease_owner.is_none());
    let a = &store.get_attempts("run").await.unwrap()[0];
    assert_eq!(a.outcome, "cancelled");
    assert!(a.finished_at.is_some());
    // The worker notices through its lease, and its late finish changes nothing.
    assert!(!store.renew_lease("run", "i1", 1, 60_000).await.unwrap());
    assert!(
        !store
            .finish_attempt(&finish(&l, "i1", AttemptOutcome::Ok, succeed()))
            .await
            .unwrap()
    );
    assert_eq!(get(&store, "run").await.status, JobStatus::Cancelled);

    insert(&store, job("done", &["a"], now)).await;
    let l = lease_one(&store, "a", "i1").await;
    assert!(
        store
            .finish_attempt(&finish(&l, "i1", AttemptOutcome::Ok, succeed()))
            .await
            .unwrap()
    );
    let j = store.cancel_job("done").await.unwrap().unwrap();
    assert_eq!(
        j.status,
        JobStatus::Succeeded,
        "a finished job stays finished"
    );
    assert!(store.cancel_job("missing").await.unwrap().is_none());
    assert!(store.running_counts().await.unwrap().is_empty());
}

/// Leases one job of `provider` for `instance` with a lease of `lease_ms`.
async fn lease_for(store: &Store, provider: &str, instance: &str, lease_ms: i64) -> LeasedJob {
    let mut req = lease_req(provider, instance, 1, ROOMY);
    req.lease_ms = lease_ms;
    let mut lease = store.lease(&req).await.unwrap();
    assert_eq!(lease.jobs.len(), 1);
    lease.jobs.remove(0)
}

async fn rescue_scopes(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("dead", &["a"], now - 30)).await;
    insert(&store, job("alive", &["b"], now - 20)).await;
    insert(&store, job("mine", &["c"], now - 10)).await;
    lease_for(&store, "a", "gone", 1).await;
    lease_for(&store, "b", "other", 60_000).await;
    lease_for(&store, "c", "me", 60_000).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Expired: only the lease nobody renewed.
    assert_eq!(store.rescue(RescueScope::Expired).await.unwrap(), vec!["a"]);
    let j = get(&store, "dead").await;
    assert_eq!(j.status, JobStatus::Queued);
    assert!(j.lease_owner.is_none() && j.lease_expires_at.is_none());
    assert_eq!(j.hop_tries, 1, "a lost attempt counts against max_retries");
    assert!(j.run_at >= now);
    let a = &store.get_attempts("dead").await.unwrap()[0];
    assert_eq!(a.outcome, "lost");
    assert!(a.finished_at.is_some() && a.error.is_some());
    assert_eq!(get(&store, "alive").await.status, JobStatus::Running);
    assert!(store.rescue(RescueScope::Expired).await.unwrap().is_empty());

    // Owner: a restarted instance takes back its own jobs, expired or not.
    assert_eq!(
        store.rescue(RescueScope::Owner("me")).await.unwrap(),
        vec!["c"]
    );
    assert_eq!(get(&store, "mine").await.status, JobStatus::Queued);
    assert_eq!(get(&store, "alive").await.status, JobStatus::Running);

    // All: everything running.
    lease_for(&store, "a", "x", 60_000).await;
    let mut all = store.rescue(RescueScope::All).await.unwrap();
    all.sort();
    assert_eq!(all, vec!["a", "b"]);
    assert!(store.running_counts().await.unwrap().is_empty());
    // The re-leased job gets a new attempt; the lost one stays in its history.
    let again = lease_one(&store, "a", "y").await;
    assert_eq!(again.attempt_n, 3);
    let outcomes: Vec<String> = store
        .get_attempts("dead")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, vec!["lost", "lost", "running"]);
}

async fn rescue_fails_orphaned_streams(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(
        &store,
        NewJob {
            stream: true,
            pinned_instance: Some("gone".into()),
            ..job("s", &["a"], now - 10)
        },
    )
    .await;
    lease_for(&store, "a", "gone", 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        store.rescue(RescueScope::Expired).await.unwrap().is_empty(),
        "a failed stream gives no provider work"
    );
    let j = get(&store, "s").await;
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.status_code, Some(502));
    assert!(j.finished_at.is_some());
    assert_eq!(store.get_attempts("s").await.unwrap()[0].outcome, "lost");
}

async fn release_gives_back_hop_tries(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("mine", &["a"], now - 20)).await;
    insert(&store, job("theirs", &["a"], now - 10)).await;
    lease_one(&store, "a", "me").await;
    lease_one(&store, "a", "them").await;
    assert_eq!(store.release_leases("me").await.unwrap(), vec!["a"]);
    let j = get(&store, "mine").await;
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!((j.hop_tries, j.attempt_count), (0, 1));
    let a = &store.get_attempts("mine").await.unwrap()[0];
    assert_eq!(a.outcome, "released");
    assert_eq!(get(&store, "theirs").await.status, JobStatus::Running);
    assert!(store.release_leases("me").await.unwrap().is_empty());
}

async fn queued_jobs_move_to_another_hop(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("q1", &["a", "b"], now - 20)).await;
    insert(&store, job("q2", &["a", "b"], now - 10)).await;
    insert(&store, job("run", &["a", "b"], now - 30)).await;
    lease_one(&store, "a", "i1").await;
    let queued: Vec<String> = store
        .queued_on("a", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(queued, vec!["q1", "q2"]);
    let mv = |id: &str, from: &str| QueuedMove {
        job_id: id.into(),
        from: from.into(),
        hop: 1,
        to: "b".into(),
    };
    // A running job, and a job no longer on `a`, are left alone.
    let moved = store
        .move_queued(&[mv("q1", "a"), mv("run", "a"), mv("q2", "zz")])
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let j = get(&store, "q1").await;
    assert_eq!(
        (j.status, j.provider.as_str(), j.hop, j.hops, j.hop_tries),
        (JobStatus::Queued, "b", 1, 1, 0)
    );
    assert_eq!(get(&store, "q2").await.provider, "a");
    assert_eq!(get(&store, "run").await.status, JobStatus::Running);
    assert_eq!(
        lease_ids(&store, &lease_req("b", "i1", 5, budget(100, 10, None))).await,
        vec!["q1"]
    );
}

async fn queued_jobs_fail_in_place(store: Store) {
    let now = store.now_ms().await.unwrap();
    insert(&store, job("f", &["a"], now - 10)).await;
    let err = JobError {
        status: 429,
        kind: "rate_limit".into(),
        message: "cooling".into(),
        code: None,
        param: None,
        retry_after: Some(90),
    };
    assert!(
        !store.fail_queued("f", "b", &err, now).await.unwrap(),
        "not queued on b"
    );
    assert!(store.fail_queued("f", "a", &err, now).await.unwrap());
    let j = get(&store, "f").await;
    assert_eq!(
        (j.status, j.status_code, j.finished_at),
        (JobStatus::Failed, Some(429), Some(now))
    );
    assert_eq!(j.error.unwrap().retry_after, Some(90));
    assert!(
        !store.fail_queued("f", "a", &err, now).await.unwrap(),
        "only once"
    );
}

async fn depths_and_running_counts(store: Store) {
    let now = store.now_ms().await.unwrap();
    for i in 0..3 {
        insert(&store, job(&format!("a{i}"), &["a"], now - 10 + i)).await;
    }
    insert(&store, job("b0", &["b"], now)).await;
    lease_one(&store, "a", "i1").await;
    let mut depths = store.queue_depths().await.unwrap();
    depths.sort();
    assert_eq!(depths, vec![("a".into(), 2), ("b".into(), 1)]);
    assert_eq!(store.running_counts().await.unwrap(), vec![("a".into(), 1)]);
}

/// Inserts, leases and finishes `n` jobs at `finished_at` = base + i / 2 (pairs tie).
async fn finished_set(store: &Store, n: i64, base: i64) -> Vec<String> {
    let now = store.now_ms().await.unwrap();
    let mut ids = vec![];
    for i in 0..n {
        let id = format!("done{i}");
        insert(store, job(&id, &["a"], now - 100 + i)).await;
        let l = lease_one(store, "a", "i1").await;
        let mut fin = finish(&l, "i1", AttemptOutcome::Ok, succeed());
        fin.finished_at = base + i / 2;
        assert!(store.finish_attempt(&fin).await.unwrap());
        ids.push(id);
    }
    ids
}

async fn finished_jobs_paging(store: Store) {
    let base = 1_700_000_000_000;
    let ids = finished_set(&store, 5, base).await;
    insert(&store, job("open", &["a"], base)).await;
    let mut seen = vec![];
    let mut after = None;
    loop {
        let page = store
            .finished_jobs(base, base + 10, after.clone(), 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        let last = page.last().unwrap();
        after = Some((last.finished_at.unwrap(), last.id.clone()));
        seen.extend(page.into_iter().map(|j| j.id));
    }
    assert_eq!(seen, ids);
    // The range is half-open.
    let window = store
        .finished_jobs(base + 1, base + 2, None, 10)
        .await
        .unwrap();
    let ids: Vec<&str> = window.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, vec!["done2", "done3"]);
}

async fn metrics_bookkeeping(store: Store) {
    let base = 1_700_000_000_000;
    finished_set(&store, 3, base).await;
    let pending = store.unwritten_metrics(base + 1, 10).await.unwrap();
    let ids: Vec<String> = pending.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids, vec!["done0", "done1"]);
    store.mark_metrics_written(&ids).await.unwrap();
    store.mark_metrics_written(&[]).await.unwrap();
    let left = store.unwritten_metrics(base + 10, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, "done2");
    assert_eq!(
        store.unwritten_metrics(base + 10, 0).await.unwrap().len(),
        0
    );
}

async fn purge_finished_jobs(store: Store) {
    let base = 1_700_000_000_000;
    finished_set(&store, 4, base).await;
    insert(&store, job("open", &["a"], base)).await;
    assert_eq!(store.purge_finished(base + 1, 1).await.unwrap(), 1);
    assert!(store.get_job("done0").await.unwrap().is_none());
    assert!(store.get_attempts("done0").await.unwrap().is_empty());
    assert_eq!(store.purge_finished(base + 1, 10).await.unwrap(), 1);
    assert!(store.get_job("done1").await.unwrap().is_none());
    assert!(store.get_job("done2").await.unwrap().is_some());
    assert_eq!(store.purge_finished(base + 100, 10).await.unwrap(), 2);
    assert!(
        store.get_job("open").await.unwrap().is_some(),
        "unfinished jobs stay"
    );
    assert_eq!(store.purge_finished(base + 100, 10).await.unwrap(), 0);
}

async fn heartbeats_and_instances(store: Store) {
    let now = store.now_ms().await.unwrap();
    store.heartbeat("b", &[]).await.unwrap();
    store.heartbeat("a", &[]).await.unwrap();
    let live = store.instances(now - 1).await.unwrap();
    let ids: Vec<&str> = live.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    let first = live[0].clone();
    assert!(first.started_at >= now && first.heartbeat_at >= first.started_at);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let providers = ["x".to_string(), "y, z".to_string()];
    store.heartbeat("a", &providers).await.unwrap();
    let again = store.instances(now - 1).await.unwrap();
    assert_eq!(
        again[0].providers, providers,
        "each beat says which providers"
    );
    assert!(again[1].providers.is_empty());
    assert_eq!(again[0].started_at, first.started_at);
    assert!(again[0].heartbeat_at > first.heartbeat_at);
    let later = store.now_ms().await.unwrap() + 60_000;
    assert!(store.instances(later).await.unwrap().is_empty());
}

/// The next notification's payload, or `None` if none comes soon.
async fn next_news(heard: &mut sqlx::postgres::PgListener) -> Option<String> {
    tokio::time::timeout(Duration::from_millis(700), heard.recv())
        .await
        .ok()
        .map(|n| n.unwrap().payload().to_string())
}

/// A Postgres instance alone on its database sends no news (nobody would hear it); as
/// soon as another instance beats or speaks, it does again.
#[tokio::test]
async fn postgres_news_only_while_another_instance_is_there() {
    use sqlx::Connection;
    use sqlx::postgres::PgListener;

    let db = TestDb::create().await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    store.start_listener(llm_orch::queue::signals::Signals::new(), stop.clone());
    let mut heard = PgListener::connect(&db.url).await.unwrap();
    heard.listen("orch_provider").await.unwrap();
    let now = store.now_ms().await.unwrap();

    // The first beat announces the instance, whoever listens.
    store.heartbeat("me", &[]).await.unwrap();
    assert_eq!(next_news(&mut heard).await.as_deref(), Some("instance:me"));
    // Alone: queued work is not announced.
    store.insert_job(&job("alone", &["a"], now)).await.unwrap();
    assert_eq!(next_news(&mut heard).await, None);

    // Another instance beats: news again.
    store.heartbeat("other", &[]).await.unwrap();
    store.heartbeat("me", &[]).await.unwrap();
    store.insert_job(&job("seen", &["a"], now)).await.unwrap();
    assert_eq!(next_news(&mut heard).await.as_deref(), Some("a"));

    // It stops beating: alone again.
    sqlx::query("UPDATE instances SET heartbeat_at = 0 WHERE id = 'other'")
        .execute(&mut sqlx::PgConnection::connect(&db.url).await.unwrap())
        .await
        .unwrap();
    store.heartbeat("me", &[]).await.unwrap();
    store.insert_job(&job("alone2", &["a"], now)).await.unwrap();
    assert_eq!(next_news(&mut heard).await, None);

    // A newcomer's announcement is heard before any heartbeat says so.
    sqlx::query("SELECT pg_notify('orch_provider', 'instance:newcomer')")
        .execute(&mut sqlx::PgConnection::connect(&db.url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        next_news(&mut heard).await.as_deref(),
        Some("instance:newcomer")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for i in 0.. {
        store
            .insert_job(&job(&format!("n{i}"), &["a"], now))
            .await
            .unwrap();
        if next_news(&mut heard).await.as_deref() == Some("a") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "news never resumed");
    }
    stop.cancel();
}
