//! `BatchStore` for Postgres (tables from `migrations/postgres/0002_batches.sql`). It reads
//! and cancels rows of the queue's `jobs` table, which the Postgres queue migration creates
//! with the same columns as SQLite's; no foreign keys tie the two, so either can land first.
//! The Postgres queue backend hands this out from `QueueStore::batches`.

use async_trait::async_trait;
use sqlx::PgPool;

use super::batches::{
    Batch, BatchEnd, BatchRow, BatchStatus, BatchStore, FileRow, JobCounts, LineError, ListOrder,
    NewFile, StoredFile, errors_json,
};
use super::row::{JobRow, error_json};
use super::{Job, JobError, JobStatus, StoreResult};
use crate::{batch_columns, file_columns, job_columns, list_files_sql};

pub struct PgBatchStore {
    pub pool: PgPool,
}

impl PgBatchStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// Sets `status` to $1 and stamps that status's time column with $2.
macro_rules! set_status {
    () => {
        "status = $1, \
         in_progress_at = CASE WHEN $1 = 'in_progress' THEN $2 ELSE in_progress_at END, \
         finalizing_at = CASE WHEN $1 = 'finalizing' THEN $2 ELSE finalizing_at END, \
         completed_at = CASE WHEN $1 = 'completed' THEN $2 ELSE completed_at END, \
         failed_at = CASE WHEN $1 = 'failed' THEN $2 ELSE failed_at END, \
         expired_at = CASE WHEN $1 = 'expired' THEN $2 ELSE expired_at END, \
         cancelling_at = CASE WHEN $1 = 'cancelling' THEN $2 ELSE cancelling_at END, \
         cancelled_at = CASE WHEN $1 = 'cancelled' THEN $2 ELSE cancelled_at END"
    };
}

fn names(statuses: &[BatchStatus]) -> Vec<String> {
    statuses.iter().map(|s| s.as_str().to_string()).collect()
}

async fn insert_file(conn: &mut sqlx::PgConnection, f: &NewFile) -> StoreResult<()> {
    let m = &f.meta;
    sqlx::query(
        "INSERT INTO files (id, caller, filename, purpose, bytes, created_at, content) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&m.id)
    .bind(m.caller.as_deref().unwrap_or(""))
    .bind(&m.filename)
    .bind(&m.purpose)
    .bind(m.bytes)
    .bind(m.created_at)
    .bind(&f.content)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl BatchStore for PgBatchStore {
    async fn insert_file(&self, file: &NewFile) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        insert_file(&mut conn, file).await
    }

    async fn get_file(&self, id: &str) -> StoreResult<Option<StoredFile>> {
        let row: Option<FileRow> = sqlx::query_as(concat!(
            "SELECT ",
            file_columns!(),
            " FROM files WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(StoredFile::from))
    }

    async fn file_content(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT content FROM files WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(c,)| c))
    }

    async fn list_files(
        &self,
        caller: Option<&str>,
        purpose: Option<&str>,
        after: Option<&str>,
        order: ListOrder,
        limit: i64,
    ) -> StoreResult<Vec<StoredFile>> {
        let sql = list_files_sql!(order, "$1", "$2::TEXT", "$3::TEXT", "$4");
        let rows: Vec<FileRow> = sqlx::query_as(sql)
            .bind(caller.unwrap_or(""))
            .bind(purpose)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(StoredFile::from).collect())
    }

    async fn delete_file(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_batch(&self, b: &Batch) -> StoreResult<()> {
        sqlx::query(concat!(
            "INSERT INTO batches (",
            batch_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, $19, $20, $21, $22)"
        ))
        .bind(&b.id)
        .bind(b.caller.as_deref().unwrap_or(""))
        .bind(b.status.as_str())
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(&b.metadata)
        .bind(errors_json(&b.errors))
        .bind(b.total)
        .bind(b.completed)
        .bind(b.failed)
        .bind(&b.output_file_id)
        .bind(&b.error_file_id)
        .bind(b.created_at)
        .bind(b.expires_at)
        .bind(b.in_progress_at)
        .bind(b.finalizing_at)
        .bind(b.completed_at)
        .bind(b.failed_at)
        .bind(b.expired_at)
        .bind(b.cancelling_at)
        .bind(b.cancelled_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_batch(&self, id: &str) -> StoreResult<Option<Batch>> {
        let row: Option<BatchRow> = sqlx::query_as(concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Batch::try_from).transpose()
    }

    async fn list_batches(
        &self,
        caller: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<Batch>> {
        let rows: Vec<BatchRow> = sqlx::query_as(concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE caller = $1 AND ($2::TEXT IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        ))
        .bind(caller.unwrap_or(""))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Batch::try_from).collect()
    }

    async fn batches_in(&self, statuses: &[BatchStatus], limit: i64) -> StoreResult<Vec<Batch>> {
        let rows: Vec<BatchRow> = sqlx::query_as(concat!(
            "SELECT ",
            batch_columns!(),
            " FROM batches WHERE status = ANY($1) ORDER BY id LIMIT $2"
        ))
        .bind(names(statuses))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Batch::try_from).collect()
    }

    async fn transition(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
        at: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(concat!(
            "UPDATE batches SET ",
            set_status!(),
            " WHERE id = $3 AND status = ANY($4)"
        ))
        .bind(to.as_str())
        .bind(at)
        .bind(id)
        .bind(names(from))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn fail_validation(&self, id: &str, errors: &[LineError], at: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE batches SET status = 'failed', failed_at = $1, errors = $2 \
             WHERE id = $3 AND status = 'validating'",
        )
        .bind(at)
        .bind(errors_json(errors))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn end_batch(&self, id: &str, end: &BatchEnd) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(concat!(
            "UPDATE batches SET ",
            set_status!(),
            ", completed = $3, failed = $4, output_file_id = $5, error_file_id = $6 \
             WHERE id = $7 AND status = $8"
        ))
        .bind(end.to.as_str())
        .bind(end.at)
        .bind(end.completed)
        .bind(end.failed)
        .bind(end.output.as_ref().map(|f| &f.meta.id))
        .bind(end.error.as_ref().map(|f| &f.meta.id))
        .bind(id)
        .bind(end.from.as_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            // Someone else ended it (or it moved on): write nothing.
            return Ok(false);
        }
        for f in end.output.iter().chain(end.error.iter()) {
            insert_file(&mut tx, f).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn job_counts(&self, batch_id: &str) -> StoreResult<JobCounts> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs WHERE batch_id = $1 GROUP BY status")
                .bind(batch_id)
                .fetch_all(&self.pool)
                .await?;
        let mut counts = JobCounts::default();
        for (status, n) in rows {
            counts.add(&status, n);
        }
        Ok(counts)
    }

    async fn batch_jobs(&self, batch_id: &str) -> StoreResult<Vec<Job>> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE batch_id = $1 ORDER BY id"
        ))
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    async fn cancel_batch_jobs(
        &self,
        batch_id: &str,
        error: &JobError,
        running: bool,
        at: i64,
    ) -> StoreResult<Vec<Job>> {
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE: a worker finishing one of these jobs at the same moment waits for us,
        // then finds it no longer running and drops its outcome.
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE batch_id = $1 AND (status = 'queued' OR ($2 AND status = 'running')) \
             ORDER BY id FOR UPDATE"
        ))
        .bind(batch_id)
        .bind(running)
        .fetch_all(&mut *tx)
        .await?;
        let jobs = rows
            .into_iter()
            .map(Job::try_from)
            .collect::<StoreResult<Vec<Job>>>()?;
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = $1, status_code = $2, error = $3, \
             lease_owner = NULL, lease_expires_at = NULL WHERE id = ANY($4)",
        )
        .bind(at)
        .bind(i64::from(error.status))
        .bind(error_json(error))
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        let was_running: Vec<String> = jobs
            .iter()
            .filter(|j| j.status == JobStatus::Running)
            .map(|j| j.id.clone())
            .collect();
        sqlx::query(
            "UPDATE attempts SET outcome = 'cancelled', finished_at = $1 \
             WHERE job_id = ANY($2) AND outcome = 'running'",
        )
        .bind(at)
        .bind(&was_running)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(jobs)
    }
}
