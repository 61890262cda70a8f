//! One conformance suite for `BatchStore`, run against SQLite and Postgres (DESIGN: one
//! store test-suite for every backend). Postgres gets only the batch migration (0002) and
//! a stand-in `jobs`/`attempts` table: the Postgres queue migration comes separately.

use llm_orch::config::SqliteSync;
use llm_orch::queue::batches::{
    Batch, BatchEnd, BatchStatus, BatchStore, LineError, ListOrder, NewFile, StoredFile,
    batch_job_error,
};
use llm_orch::queue::postgres::PostgresStore;
use llm_orch::queue::sqlite::SqliteStore;
use llm_orch::queue::{JobStatus, NewJob, PRIORITY_BATCH, QueueStore};

const BATCH: &str = "batch_t1";

fn file(id: &str, caller: &str, purpose: &str) -> NewFile {
    NewFile {
        meta: StoredFile {
            id: id.into(),
            caller: Some(caller.into()),
            filename: format!("{id}.jsonl"),
            purpose: purpose.into(),
            bytes: 3,
            created_at: 1_000,
        },
        content: b"{}\n".to_vec(),
    }
}

fn batch(id: &str, caller: &str) -> Batch {
    Batch {
        id: id.into(),
        caller: Some(caller.into()),
        status: BatchStatus::Validating,
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-a".into(),
        completion_window: "24h".into(),
        metadata: Some(r#"{"k":"v"}"#.into()),
        errors: vec![],
        total: 3,
        completed: 0,
        failed: 0,
        output_file_id: None,
        error_file_id: None,
        created_at: 1_000,
        expires_at: 2_000,
        in_progress_at: None,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
    }
}

/// Three queued lines of `BATCH`, inserted out of order (reads must sort them).
fn jobs() -> Vec<NewJob> {
    [3, 1, 2]
        .into_iter()
        .map(|n| NewJob {
            id: format!("job_t1_{n:06}"),
            task: "DEFAULT".into(),
            chain: vec!["p".into()],
            hop: 0,
            request: "{}".into(),
            stream: false,
            priority: PRIORITY_BATCH,
            caller: Some("c1".into()),
            idempotency_key: None,
            pinned_instance: None,
            created_at: 1_000,
            deadline_at: 2_000,
            batch_id: Some(BATCH.into()),
            custom_id: Some(format!("line{n}")),
        })
        .collect()
}

async fn conformance(store: &dyn BatchStore) {
    // Files: owner-scoped lists, newest (largest id) first or oldest first, purpose filter,
    // delete.
    for f in [
        file("file-a", "c1", "batch"),
        file("file-b", "c1", "batch_output"),
        file("file-c", "c2", "batch"),
    ] {
        store.insert_file(&f).await.unwrap();
    }
    let a = store.get_file("file-a").await.unwrap().unwrap();
    assert_eq!(a, file("file-a", "c1", "batch").meta);
    assert_eq!(
        store.file_content("file-a").await.unwrap().unwrap(),
        b"{}\n"
    );
    // Caller c1's files, by purpose, cursor and order: their ids.
    let list = |purpose, after, order| async move {
        let files: Vec<StoredFile> = store
            .list_files(Some("c1"), purpose, after, order, 10)
            .await
            .unwrap();
        files.into_iter().map(|f| f.id).collect::<Vec<_>>()
    };
    assert_eq!(
        list(None, None, ListOrder::Desc).await,
        ["file-b", "file-a"]
    );
    assert_eq!(list(None, None, ListOrder::Asc).await, ["file-a", "file-b"]);
    assert_eq!(list(None, Some("file-a"), ListOrder::Asc).await, ["file-b"]);
    assert_eq!(list(Some("batch"), None, ListOrder::Desc).await, ["file-a"]);
    assert_eq!(
        list(None, Some("file-b"), ListOrder::Desc).await,
        ["file-a"]
    );
    assert!(store.delete_file("file-c").await.unwrap());
    assert!(!store.delete_file("file-c").await.unwrap());
    assert!(store.get_file("file-c").await.unwrap().is_none());

    // Batches: conditional moves stamp their time; lists are owner-scoped, newest first.
    store.insert_batch(&batch(BATCH, "c1")).await.unwrap();
    store.insert_batch(&batch("batch_t2", "c1")).await.unwrap();
    assert_eq!(
        store.get_batch(BATCH).await.unwrap().unwrap(),
        batch(BATCH, "c1")
    );
    let v = [BatchStatus::Validating];
    assert!(
        store
            .transition(BATCH, &v, BatchStatus::InProgress, 1_100)
            .await
            .unwrap()
    );
    assert!(
        !store
            .transition(BATCH, &v, BatchStatus::InProgress, 1_200)
            .await
            .unwrap()
    );
    let b = store.get_batch(BATCH).await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.in_progress_at),
        (BatchStatus::InProgress, Some(1_100))
    );
    let listed: Vec<String> = store
        .list_batches(Some("c1"), None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(listed, ["batch_t2", BATCH]);
    assert!(
        store
            .list_batches(Some("c2"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let active = store
        .batches_in(&[BatchStatus::InProgress], 10)
        .await
        .unwrap();
    assert_eq!(active.len(), 1);

    let err = LineError {
        code: "invalid_url".into(),
        message: "m".into(),
        param: Some("url".into()),
        line: Some(2),
    };
    assert!(
        store
            .fail_validation("batch_t2", std::slice::from_ref(&err), 1_300)
            .await
            .unwrap()
    );
    let failed = store.get_batch("batch_t2").await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.errors, failed.failed_at),
        (BatchStatus::Failed, vec![err], Some(1_300))
    );

    // The batch's jobs: counted, read in line order, cancelled.
    let counts = store.job_counts(BATCH).await.unwrap();
    assert_eq!((counts.queued, counts.unfinished()), (3, 3));
    let lines: Vec<Option<String>> = store
        .batch_jobs(BATCH)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.custom_id)
        .collect();
    assert_eq!(
        lines,
        [
            Some("line1".into()),
            Some("line2".into()),
            Some("line3".into())
        ]
    );
    let cancelled = store
        .cancel_batch_jobs(
            BATCH,
            &batch_job_error("batch_cancelled", "stop"),
            false,
            1_400,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 3);
    assert_eq!(store.job_counts(BATCH).await.unwrap().cancelled, 3);
    let job = &store.batch_jobs(BATCH).await.unwrap()[0];
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(
        job.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("batch_cancelled")
    );

    // Ending is conditional and writes its files with the status, or nothing.
    let end = BatchEnd {
        from: BatchStatus::Finalizing,
        to: BatchStatus::Completed,
        completed: 2,
        failed: 1,
        output: Some(file("file-out", "c1", "batch_output")),
        error: None,
        at: 1_500,
    };
    assert!(!store.end_batch(BATCH, &end).await.unwrap());
    assert!(store.get_file("file-out").await.unwrap().is_none());
    let ip = [BatchStatus::InProgress];
    assert!(
        store
            .transition(BATCH, &ip, BatchStatus::Finalizing, 1_450)
            .await
            .unwrap()
    );
    assert!(store.end_batch(BATCH, &end).await.unwrap());
    assert!(!store.end_batch(BATCH, &end).await.unwrap());
    let done = store.get_batch(BATCH).await.unwrap().unwrap();
    assert_eq!(
        (
            done.status,
            done.completed,
            done.failed,
            done.finalizing_at,
            done.completed_at
        ),
        (BatchStatus::Completed, 2, 1, Some(1_450), Some(1_500))
    );
    assert_eq!(done.output_file_id.as_deref(), Some("file-out"));
    assert_eq!(done.error_file_id, None);
    assert!(store.get_file("file-out").await.unwrap().is_some());
}

#[tokio::test]
async fn sqlite_batch_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("orch.db"), SqliteSync::Normal)
        .await
        .unwrap();
    store.insert_jobs(&jobs(), &[]).await.unwrap();
    conformance(store.batches().expect("SQLite has batches")).await;
}

#[tokio::test]
async fn postgres_batch_store_conforms() {
    // The real Postgres store with its own migrations; an unreachable server fails the test.
    let db = crate::support::pg::TestDb::create().await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    store.insert_jobs(&jobs(), &[]).await.unwrap();
    conformance(store.batches().expect("Postgres has batches")).await;
}
