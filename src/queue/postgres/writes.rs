//! The statements that write many jobs, or end many attempts, at once: for batches of
//! the Batch API and for the groups `grouped` forms from concurrent requests.

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, Row};

use crate::queue::row::{chain_json, error_json};
use crate::queue::{AttemptFinish, NewJob, Transition};

/// Inserts `jobs` (at most a few thousand; the arrays travel in one message). Returns, in
/// order, each job's provider when it was inserted, `None` when its idempotency key
/// repeated an earlier job's (within the group too: the first one wins).
pub async fn insert_jobs(
    conn: &mut PgConnection,
    jobs: &[NewJob],
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let col = |f: &dyn Fn(&NewJob) -> String| jobs.iter().map(f).collect::<Vec<_>>();
    let opt = |f: &dyn Fn(&NewJob) -> Option<&str>| jobs.iter().map(f).collect::<Vec<_>>();
    let int = |f: &dyn Fn(&NewJob) -> i64| jobs.iter().map(f).collect::<Vec<_>>();
    let requests: Vec<&str> = jobs.iter().map(|j| j.request.as_str()).collect();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO jobs (id, task, status, priority, chain, hop, provider, request, stream, \
         caller, idempotency_key, pinned_instance, run_at, deadline_at, created_at, batch_id, custom_id) \
         SELECT id, task, 'queued', priority, chain, hop, provider, request, stream, caller, ikey, \
         pinned, created_at, deadline_at, created_at, batch_id, custom_id \
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], \
         $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bigint[], \
         $14::text[], $15::text[]) AS t(id, task, priority, chain, hop, provider, request, stream, \
         caller, ikey, pinned, created_at, deadline_at, batch_id, custom_id) \
         ON CONFLICT (caller, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
         RETURNING id, provider",
    )
    .bind(col(&|j| j.id.clone()))
    .bind(col(&|j| j.task.clone()))
    .bind(int(&|j| j.priority))
    .bind(col(&|j| chain_json(&j.chain)))
    .bind(int(&|j| j.hop as i64))
    .bind(jobs.iter().map(NewJob::provider).collect::<Vec<_>>())
    .bind(requests)
    .bind(int(&|j| i64::from(j.stream)))
    .bind(col(&|j| j.caller.clone().unwrap_or_default()))
    .bind(opt(&|j| j.idempotency_key.as_deref()))
    .bind(opt(&|j| j.pinned_instance.as_deref()))
    .bind(int(&|j| j.created_at))
    .bind(int(&|j| j.deadline_at))
    .bind(opt(&|j| j.batch_id.as_deref()))
    .bind(opt(&|j| j.custom_id.as_deref()))
    .fetch_all(conn)
    .await?;
    let mut inserted: std::collections::HashMap<String, String> = rows.into_iter().collect();
    Ok(jobs.iter().map(|j| inserted.remove(&j.id)).collect())
}

/// One attempt's end as `orch_finish` takes it.
struct FinishArgs<'a> {
    kind: &'static str,
    result: Option<&'a str>,
    job_status: Option<i64>,
    job_error: Option<String>,
    requeue: Option<(i64, i64, &'a str)>,
    usage: (Option<i64>, Option<i64>),
    threshold: i64,
    open_ms: i64,
}

fn finish_args(fin: &AttemptFinish) -> FinishArgs<'_> {
    let (kind, result, job_status, job_error, requeue) = match &fin.transition {
        Transition::Succeed { result, .. } => ("succeed", Some(result.as_str()), None, None, None),
        Transition::Fail { error, partial } => (
            "fail",
            partial.as_deref(),
            Some(i64::from(error.status)),
            Some(error_json(error)),
            None,
        ),
        Transition::Requeue {
            hop,
            provider,
            run_at,
        } => (
            "requeue",
            None,
            None,
            None,
            Some((*run_at, *hop as i64, provider.as_str())),
        ),
    };
    let usage = match &fin.transition {
        Transition::Succeed {
            usage_prompt,
            usage_completion,
            ..
        } => (*usage_prompt, *usage_completion),
        _ => (None, None),
    };
    let (threshold, open_ms) = fin
        .effect
        .breaker
        .map_or((i64::MAX, 0), |(t, ms)| (i64::from(t), ms));
    FinishArgs {
        kind,
        result,
        job_status,
        job_error,
        requeue,
        usage,
        threshold,
        open_ms,
    }
}

/// Ends attempts with `orch_finish`, all in one statement and so one transaction, whose
/// `synchronous_commit` is `commit` (`NULL`: the server's; see `commit_wait`).
/// Returns, in order, whether each attempt's lease was still held (its outcome written).
///
/// The attempts are finished in provider order, so that two groups touching the same
/// providers' shared rows lock them in the same order and cannot deadlock.
pub async fn finish_attempts(
    conn: &mut PgConnection,
    fins: &[AttemptFinish],
    commit: Option<&'static str>,
) -> Result<Vec<bool>, sqlx::Error> {
    let mut order: Vec<usize> = (0..fins.len()).collect();
    order.sort_by(|&a, &b| fins[a].provider.cmp(&fins[b].provider));
    let sorted: Vec<&AttemptFinish> = order.iter().map(|&i| &fins[i]).collect();
    let args: Vec<FinishArgs> = sorted.iter().map(|f| finish_args(f)).collect();
    let q = finish_query(&order, &sorted, &args).bind(commit);
    let rows: Vec<PgRow> = q.fetch_all(conn).await?;
    let mut done = vec![false; fins.len()];
    for row in rows {
        let i: i64 = row.try_get(0)?;
        let ok: bool = row.try_get(1)?;
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| done.get_mut(i)) {
            *slot = ok;
        }
    }
    Ok(done)
}

fn finish_query<'q>(
    order: &[usize],
    fins: &[&'q AttemptFinish],
    args: &[FinishArgs<'q>],
) -> Query<'q, Postgres, PgArguments> {
    let f = |g: &dyn Fn(&AttemptFinish) -> i64| fins.iter().map(|x| g(x)).collect::<Vec<_>>();
    let fo =
        |g: &dyn Fn(&AttemptFinish) -> Option<i64>| fins.iter().map(|x| g(x)).collect::<Vec<_>>();
    let s =
        |g: &dyn Fn(&'q AttemptFinish) -> &'q str| fins.iter().map(|x| g(x)).collect::<Vec<_>>();
    let a = |g: &dyn Fn(&FinishArgs<'q>) -> Option<i64>| args.iter().map(g).collect::<Vec<_>>();
    let effect = |g: &dyn Fn(&AttemptFinish) -> bool| fins.iter().map(|x| g(x)).collect::<Vec<_>>();
    sqlx::query(concat!(
        "SELECT t.i, orch_finish(t.job_id, t.attempt_n, t.instance, t.provider, t.finished_at, \
         t.outcome, t.status_code, t.error, t.tokens, t.count_tokens, t.kind, t.result, \
         t.usage_prompt, t.usage_completion, t.job_status, t.job_error, t.run_at, t.hop, \
         t.to_provider, t.effect, t.cooldown_until, t.success, t.threshold, t.open_ms) \
         FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::bigint[], \
         $7::text[], $8::bigint[], $9::text[], $10::bigint[], $11::boolean[], $12::text[], \
         $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], $18::bigint[], \
         $19::bigint[], $20::text[], $21::boolean[], $22::bigint[], $23::boolean[], $24::bigint[], \
         $25::bigint[]) AS t(i, job_id, attempt_n, instance, provider, finished_at, outcome, \
         status_code, error, tokens, count_tokens, kind, result, usage_prompt, usage_completion, \
         job_status, job_error, run_at, hop, to_provider, effect, cooldown_until, success, \
         threshold, open_ms)",
        commit_wait!(26)
    ))
    .bind(order.iter().map(|&i| i as i64).collect::<Vec<_>>())
    .bind(s(&|x| x.job_id.as_str()))
    .bind(f(&|x| x.attempt_n))
    .bind(s(&|x| x.instance.as_str()))
    .bind(s(&|x| x.provider.as_str()))
    .bind(f(&|x| x.finished_at))
    .bind(s(&|x| x.outcome.as_str()))
    .bind(fo(&|x| x.status_code))
    .bind(fins.iter().map(|x| x.error.as_deref()).collect::<Vec<_>>())
    .bind(fo(&|x| x.tokens))
    .bind(effect(&|x| x.count_tokens))
    .bind(args.iter().map(|x| x.kind).collect::<Vec<_>>())
    .bind(args.iter().map(|x| x.result).collect::<Vec<_>>())
    .bind(a(&|x| x.usage.0))
    .bind(a(&|x| x.usage.1))
    .bind(a(&|x| x.job_status))
    .bind(
        args.iter()
            .map(|x| x.job_error.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(a(&|x| x.requeue.map(|r| r.0)))
    .bind(a(&|x| x.requeue.map(|r| r.1)))
    .bind(
        args.iter()
            .map(|x| x.requeue.map(|r| r.2))
            .collect::<Vec<_>>(),
    )
    .bind(effect(&|x| {
        x.effect.cooldown_until.is_some() || x.effect.success.is_some()
    }))
    .bind(fo(&|x| x.effect.cooldown_until))
    .bind(fins.iter().map(|x| x.effect.success).collect::<Vec<_>>())
    .bind(args.iter().map(|x| x.threshold).collect::<Vec<_>>())
    .bind(args.iter().map(|x| x.open_ms).collect::<Vec<_>>())
}
