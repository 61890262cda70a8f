//! What happens after an attempt: succeed, retry on the same provider, hop to the next,
//! wait out a cool-down, or fail. Pure functions of the attempt's result, the job and
//! the providers' shared state, so every rule is unit-tested without a network.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::Rng;

use crate::providers::ProviderError;
use crate::queue::{Attempt, AttemptOutcome, Job, JobError, ProviderEffect, Transition};

/// How the worker sees a failed call.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureClass {
    /// 429: the provider cools down for this long.
    RateLimited { status: u16, cooldown: Duration },
    /// 408, 409, 5xx, timeouts, connection errors, unreadable bodies: back off and retry.
    Retryable { status: Option<u16> },
    /// Any other upstream 4xx: returned to the caller as is.
    Fatal { status: u16 },
    /// The request cannot be expressed for this provider: a 400, not retried.
    Invalid,
}

pub fn classify(err: &ProviderError, default_cooldown: Duration) -> FailureClass {
    match err {
        ProviderError::Status {
            status: 429,
            retry_after,
            ..
        } => FailureClass::RateLimited {
            status: 429,
            cooldown: retry_after.unwrap_or(default_cooldown),
        },
        ProviderError::Status { status, .. } if matches!(status, 408 | 409) || *status >= 500 => {
            FailureClass::Retryable {
                status: Some(*status),
            }
        }
        ProviderError::Status { status, .. } if (400..500).contains(status) => {
            FailureClass::Fatal { status: *status }
        }
        // 1xx/3xx or other oddities: treat as a broken upstream.
        ProviderError::Status { status, .. } => FailureClass::Retryable {
            status: Some(*status),
        },
        ProviderError::Timeout(_) | ProviderError::Network(_) | ProviderError::BadResponse(_) => {
            FailureClass::Retryable { status: None }
        }
        ProviderError::Invalid(_) => FailureClass::Invalid,
    }
}

/// What the policy knows besides the failure itself.
pub struct Context<'a> {
    pub job: &'a Job,
    pub now: i64,
    /// Retries allowed on the current provider before hopping.
    pub max_retries: u32,
    /// When each provider of the chain can take calls again (cool-down or open breaker), ms.
    pub unavailable_until: &'a HashMap<String, i64>,
    /// The providers that have failed this job already: their retries ran out on it
    /// (`spent_providers` of its attempts). The job does not go back to them.
    pub spent: &'a HashSet<String>,
    /// Breaker settings of the current provider: (failure threshold, open for ms).
    pub breaker: Option<(u32, i64)>,
}

/// The policy's verdict on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: AttemptOutcome,
    pub transition: Transition,
    pub effect: ProviderEffect,
}

/// Delay before retry number `retry` (1-based) on the same provider: exponential with
/// jitter in [d/2, d], d = 200 ms · 2^(retry−1), capped at 20 s.
pub fn backoff(retry: i64) -> Duration {
    let exp = u32::try_from(retry.clamp(1, 10) - 1).unwrap_or(0);
    let full = (200u64 << exp).min(20_000);
    let jittered = rand::rng().random_range(full / 2..=full);
    Duration::from_millis(jittered)
}

/// Decides after a failed call.
pub fn on_failure(err: &ProviderError, class: &FailureClass, ctx: &Context<'_>) -> Decision {
    let job = ctx.job;
    let failure_effect = ProviderEffect {
        success: Some(false),
        breaker: ctx.breaker,
        ..Default::default()
    };
    match class {
        FailureClass::Invalid => Decision {
            outcome: AttemptOutcome::Failed,
            transition: Transition::Fail {
                error: job_error(400, "invalid_request_error", err.to_string()),
                partial: None,
            },
            effect: ProviderEffect::default(),
        },
        FailureClass::Fatal { status } => Decision {
            outcome: AttemptOutcome::Failed,
            transition: Transition::Fail {
                error: passed_through(*status, err),
                partial: None,
            },
            effect: ProviderEffect::default(),
        },
        FailureClass::RateLimited { cooldown, .. } => {
            let until = ctx.now + i64::try_from(cooldown.as_millis()).unwrap_or(i64::MAX / 2);
            let mut unavailable = ctx.unavailable_until.clone();
            let current = unavailable.entry(job.provider.clone()).or_insert(until);
            *current = (*current).max(until);
            let effect = ProviderEffect {
                cooldown_until: Some(until),
                ..Default::default()
            };
            // A 429 is no failure of this job: the provider stays a candidate for it.
            let mut spent = ctx.spent.clone();
            spent.remove(&job.provider);
            if let Some(hop) = next_available(job, &unavailable, &spent, ctx.now) {
                return requeue(job, hop, ctx.now, AttemptOutcome::Hop, effect);
            }
            // Every provider left is cooling down: wait for the first to come back, within
            // the deadline (the current one is always left, so there is a first).
            let (hop, at) =
                earliest(job, &unavailable, &spent, ctx.now).unwrap_or((job.hop, i64::MAX));
            if at <= job.deadline_at {
                return requeue(job, hop, at, AttemptOutcome::Cooldown, effect);
            }
            Decision {
                outcome: AttemptOutcome::Failed,
                transition: Transition::Fail {
                    error: rate_limited_error(&job.task, &message_of(err), at - ctx.now),
                    partial: None,
                },
                effect,
            }
        }
        FailureClass::Retryable { .. } => {
            if retries_left(job, ctx.max_retries) {
                let at = ctx.now + i64::try_from(backoff(job.hop_tries).as_millis()).unwrap_or(0);
                return requeue(job, job.hop, at, AttemptOutcome::Retry, failure_effect);
            }
            let mut spent = ctx.spent.clone();
            spent.insert(job.provider.clone());
            if let Some(hop) = next_available(job, ctx.unavailable_until, &spent, ctx.now) {
                return requeue(job, hop, ctx.now, AttemptOutcome::Hop, failure_effect);
            }
            // The providers that have not failed this job are cooling down (or their
            // breaker is open): one that comes back within the deadline is waited for, as
            // after a 429. Only when none is left, or none comes back in time, does the
            // job fail.
            if let Some((hop, at)) = earliest(job, ctx.unavailable_until, &spent, ctx.now)
                && at <= job.deadline_at
            {
                return requeue(job, hop, at, AttemptOutcome::Hop, failure_effect);
            }
            Decision {
                outcome: AttemptOutcome::Failed,
                transition: Transition::Fail {
                    error: job_error(502, "provider_server_error", message_of(err)),
                    partial: None,
                },
                effect: failure_effect,
            }
        }
    }
}

/// Decides after a successful call.
pub fn on_success(
    result: String,
    usage_prompt: Option<i64>,
    usage_completion: Option<i64>,
) -> Decision {
    Decision {
        outcome: AttemptOutcome::Ok,
        transition: Transition::Succeed {
            result,
            usage_prompt,
            usage_completion,
        },
        effect: ProviderEffect {
            success: Some(true),
            ..Default::default()
        },
    }
}

/// The 429 of a job whose every provider is cooling down past its deadline; `wait_ms`:
/// until the first of them is back.
pub fn rate_limited_error(task: &str, last: &str, wait_ms: i64) -> JobError {
    let wait_s = (wait_ms.max(0) + 999) / 1000;
    JobError {
        status: 429,
        kind: "rate_limit".into(),
        message: format!(
            "every provider of route {task} is cooling down past this request's deadline (last: {last})"
        ),
        code: Some("rate_limited".into()),
        param: None,
        retry_after: Some(u64::try_from(wait_s).unwrap_or(0)),
    }
}

/// The first provider after the current one that can take calls now and has not failed
/// the job (`spent`).
pub fn next_available(
    job: &Job,
    unavailable_until: &HashMap<String, i64>,
    spent: &HashSet<String>,
    now: i64,
) -> Option<usize> {
    (job.hop + 1..job.chain.len()).find(|&i| {
        !spent.contains(&job.chain[i])
            && unavailable_until
                .get(&job.chain[i])
                .is_none_or(|&t| t <= now)
    })
}

/// The provider of the chain that has not failed the job (`spent`) and becomes available
/// first, and when; `None` when every provider has failed it.
pub fn earliest(
    job: &Job,
    unavailable_until: &HashMap<String, i64>,
    spent: &HashSet<String>,
    now: i64,
) -> Option<(usize, i64)> {
    let candidates = job.chain.iter().enumerate();
    soonest(
        candidates.filter(|(_, p)| !spent.contains(*p)),
        unavailable_until,
        now,
    )
}

/// The providers whose retries ran out on a job, read from its attempts: those it left
/// (or failed on) after a failure that was not a 429. A 429 only sends the job on.
pub fn spent_providers(attempts: &[Attempt]) -> HashSet<String> {
    attempts
        .iter()
        .filter(|a| {
            let left = [AttemptOutcome::Hop, AttemptOutcome::Failed]
                .iter()
                .any(|o| a.outcome == o.as_str());
            left && a.status_code != Some(429)
        })
        .map(|a| a.provider.clone())
        .collect()
}

/// Whether the job may try its current provider again: `hop_tries` counts the tries on
/// it so far, this one included.
fn retries_left(job: &Job, max_retries: u32) -> bool {
    job.hop_tries - 1 < i64::from(max_retries)
}

/// Whether the decision after this failure may send the job to another provider, and so
/// needs to know which providers have failed it (`Context::spent`).
pub fn may_leave(class: &FailureClass, job: &Job, max_retries: u32) -> bool {
    match class {
        FailureClass::RateLimited { .. } => true,
        FailureClass::Retryable { .. } => !retries_left(job, max_retries),
        FailureClass::Fatal { .. } | FailureClass::Invalid => false,
    }
}

/// Where a new job starts: the first provider of the chain that is available, else the
/// one that becomes available first, with that moment.
pub fn first_available(
    chain: &[String],
    unavailable_until: &HashMap<String, i64>,
    now: i64,
) -> (usize, i64) {
    soonest(chain.iter().enumerate(), unavailable_until, now).unwrap_or((0, i64::MAX))
}

/// Of `candidates` (chain position, provider) in chain order, the first available now,
/// else the one available soonest, with that moment.
fn soonest<'p>(
    candidates: impl Iterator<Item = (usize, &'p String)>,
    unavailable_until: &HashMap<String, i64>,
    now: i64,
) -> Option<(usize, i64)> {
    let mut best: Option<(usize, i64)> = None;
    for (i, p) in candidates {
        let at = unavailable_until.get(p).copied().unwrap_or(now).max(now);
        if at == now {
            return Some((i, now));
        }
        if best.is_none_or(|(_, b)| at < b) {
            best = Some((i, at));
        }
    }
    best
}

fn requeue(
    job: &Job,
    hop: usize,
    run_at: i64,
    outcome: AttemptOutcome,
    effect: ProviderEffect,
) -> Decision {
    Decision {
        outcome,
        transition: Transition::Requeue {
            hop,
            provider: job.chain[hop].clone(),
            run_at,
        },
        effect,
    }
}

fn job_error(status: u16, kind: &str, message: String) -> JobError {
    JobError {
        status,
        kind: kind.into(),
        message,
        code: None,
        param: None,
        retry_after: None,
    }
}

/// An upstream 4xx returned to the caller as it is: its status, message, `code` and
/// `param` (an SDK user may test `code`, e.g. `context_length_exceeded`).
fn passed_through(status: u16, err: &ProviderError) -> JobError {
    match err {
        ProviderError::Status {
            message,
            code,
            param,
            ..
        } => JobError {
            code: code.clone(),
            param: param.clone(),
            ..job_error(status, "provider_error", message.clone())
        },
        other => job_error(status, "provider_error", other.to_string()),
    }
}

/// The upstream's own words where there are some, else the error's description.
fn message_of(err: &ProviderError) -> String {
    match err {
        ProviderError::Status {
            status, message, ..
        } => format!("{status}: {message}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(chain: &[&str], hop: usize, hop_tries: i64) -> Job {
        Job::running_for_test(chain, hop, hop_tries)
    }

    fn decide(err: ProviderError, job: &Job, unavailable: &HashMap<String, i64>) -> Decision {
        decide_spent(err, job, unavailable, &[])
    }

    fn requeued(hop: usize, provider: &str, run_at: i64) -> Transition {
        Transition::Requeue {
            hop,
            provider: provider.into(),
            run_at,
        }
    }

    /// As `decide`, for a job that the providers `spent` have failed already.
    fn decide_spent(
        err: ProviderError,
        job: &Job,
        unavailable: &HashMap<String, i64>,
        spent: &[&str],
    ) -> Decision {
        let class = classify(&err, Duration::from_secs(30));
        let spent: HashSet<String> = spent.iter().map(|p| p.to_string()).collect();
        let ctx = Context {
            job,
            now: 1_000,
            max_retries: 2,
            unavailable_until: unavailable,
            spent: &spent,
            breaker: None,
        };
        on_failure(&err, &class, &ctx)
    }

    fn status(code: u16, retry_after: Option<u64>) -> ProviderError {
        ProviderError::Status {
            status: code,
            message: "boom".into(),
            retry_after: retry_after.map(Duration::from_secs),
            code: None,
            param: None,
        }
    }

    #[test]
    fn classification_follows_the_contract() {
        let d = Duration::from_secs(30);
        for code in [408, 409, 500, 502, 503, 529] {
            assert!(
                matches!(
                    classify(&status(code, None), d),
                    FailureClass::Retryable { .. }
                ),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 422] {
            assert_eq!(
                classify(&status(code, None), d),
                FailureClass::Fatal { status: code }
            );
        }
        assert_eq!(
            classify(&status(429, Some(7)), d),
            FailureClass::RateLimited {
                status: 429,
                cooldown: Duration::from_secs(7)
            }
        );
        assert_eq!(
            classify(&status(429, None), d),
            FailureClass::RateLimited {
                status: 429,
                cooldown: d
            }
        );
        assert!(matches!(
            classify(&ProviderError::Timeout(d), d),
            FailureClass::Retryable { status: None }
        ));
        assert!(matches!(
            classify(&ProviderError::BadResponse("x".into()), d),
            FailureClass::Retryable { .. }
        ));
    }

    #[test]
    fn server_errors_retry_then_hop_then_fail() {
        let none = HashMap::new();
        let d = decide(status(503, None), &job(&["a", "b"], 0, 1), &none);
        assert_eq!(d.outcome, AttemptOutcome::Retry);
        let Transition::Requeue { hop, run_at, .. } = d.transition else {
            panic!()
        };
        assert_eq!(hop, 0);
        assert!((1_100..=1_200).contains(&run_at), "{run_at}");

        let d = decide(status(503, None), &job(&["a", "b"], 0, 3), &none);
        assert_eq!(d.outcome, AttemptOutcome::Hop);
        assert_eq!(
            d.transition,
            Transition::Requeue {
                hop: 1,
                provider: "b".into(),
                run_at: 1_000
            }
        );

        // On `b`, after `a` failed the job too.
        let d = decide_spent(status(503, None), &job(&["a", "b"], 1, 3), &none, &["a"]);
        let Transition::Fail { error, .. } = d.transition else {
            panic!()
        };
        assert_eq!(
            (error.status, error.kind.as_str()),
            (502, "provider_server_error")
        );
        assert!(error.message.contains("boom"));
    }

    #[test]
    fn other_4xx_fail_at_once_with_their_status() {
        let d = decide(status(404, None), &job(&["a", "b"], 0, 1), &HashMap::new());
        let Transition::Fail { error, .. } = d.transition else {
            panic!()
        };
        assert_eq!((error.status, error.kind.as_str()), (404, "provider_error"));
    }

    #[test]
    fn rate_limit_hops_at_once_and_cools_down() {
        let d = decide(
            status(429, Some(5)),
            &job(&["a", "b"], 0, 1),
            &HashMap::new(),
        );
        assert_eq!(d.outcome, AttemptOutcome::Hop);
        assert_eq!(d.effect.cooldown_until, Some(6_000));
        assert_eq!(
            d.transition,
            Transition::Requeue {
                hop: 1,
                provider: "b".into(),
                run_at: 1_000
            }
        );
    }

    #[test]
    fn rate_limit_on_the_last_hop_waits_within_the_deadline() {
        let d = decide(status(429, Some(5)), &job(&["a"], 0, 1), &HashMap::new());
        assert_eq!(d.outcome, AttemptOutcome::Cooldown);
        assert_eq!(
            d.transition,
            Transition::Requeue {
                hop: 0,
                provider: "a".into(),
                run_at: 6_000
            }
        );
    }

    #[test]
    fn rate_limit_past_the_deadline_fails_with_retry_after() {
        let d = decide(status(429, Some(500)), &job(&["a"], 0, 1), &HashMap::new());
        let Transition::Fail { error, .. } = d.transition else {
            panic!()
        };
        assert_eq!(
            (error.status, error.kind.as_str(), error.retry_after),
            (429, "rate_limit", Some(500))
        );
    }

    #[test]
    fn waiting_picks_the_provider_that_returns_first() {
        let mut unavailable = HashMap::new();
        unavailable.insert("a".to_string(), 3_000);
        let d = decide(status(429, Some(60)), &job(&["a", "b"], 1, 1), &unavailable);
        assert_eq!(
            d.transition,
            Transition::Requeue {
                hop: 0,
                provider: "a".into(),
                run_at: 3_000
            }
        );
    }

    #[test]
    fn hops_skip_providers_that_are_unavailable() {
        let mut unavailable = HashMap::new();
        unavailable.insert("b".to_string(), 50_000);
        let d = decide(
            status(500, None),
            &job(&["a", "b", "c"], 0, 3),
            &unavailable,
        );
        assert_eq!(
            d.transition,
            Transition::Requeue {
                hop: 2,
                provider: "c".into(),
                run_at: 1_000
            }
        );
    }

    /// `a` failed the job (its retries ran out), `b` answered 429: the job waits for `b`
    /// rather than going back to `a`, whose cool-down-free state says nothing about it.
    #[test]
    fn a_rate_limit_does_not_send_the_job_back_to_a_provider_that_failed_it() {
        let d = decide_spent(
            status(429, Some(5)),
            &job(&["a", "b"], 1, 1),
            &HashMap::new(),
            &["a"],
        );
        assert_eq!(d.outcome, AttemptOutcome::Cooldown);
        assert_eq!(d.transition, requeued(1, "b", 6_000));
        // Without that history, `a` (free now) takes it, as a provider that only cooled
        // down would.
        let d = decide(
            status(429, Some(5)),
            &job(&["a", "b"], 1, 1),
            &HashMap::new(),
        );
        assert_eq!(d.transition, requeued(0, "a", 1_000));
    }

    /// Retries ran out on `a`; `b` cools down until 4 s, within the deadline: the job
    /// waits for it instead of failing with 502.
    #[test]
    fn exhausted_retries_wait_for_a_later_provider_that_is_cooling_down() {
        let mut unavailable = HashMap::new();
        unavailable.insert("b".to_string(), 4_000);
        let d = decide(status(503, None), &job(&["a", "b"], 0, 3), &unavailable);
        assert_eq!(d.outcome, AttemptOutcome::Hop);
        assert_eq!(d.transition, requeued(1, "b", 4_000));
        // The failure still counts against `a`.
        assert_eq!(d.effect.success, Some(false));
    }

    /// A provider skipped when the job started (it was cooling down) and back now is
    /// tried before the job fails, though it comes before the current one.
    #[test]
    fn exhausted_retries_go_back_to_a_provider_that_never_failed_the_job() {
        let d = decide(status(500, None), &job(&["a", "b"], 1, 3), &HashMap::new());
        assert_eq!(d.outcome, AttemptOutcome::Hop);
        assert_eq!(d.transition, requeued(0, "a", 1_000));
    }

    #[test]
    fn exhausted_retries_fail_when_every_other_provider_failed_or_returns_too_late() {
        let fails_502 = |d: Decision| {
            let Transition::Fail { error, .. } = d.transition else {
                panic!("{d:?}")
            };
            assert_eq!(
                (error.status, error.kind.as_str()),
                (502, "provider_server_error")
            );
        };
        // Every other provider failed the job.
        fails_502(decide_spent(
            status(500, None),
            &job(&["a", "b", "c"], 2, 3),
            &HashMap::new(),
            &["a", "b"],
        ));
        // The one left cools down past the deadline.
        let late = job(&["a", "b"], 0, 3);
        let mut unavailable = HashMap::new();
        unavailable.insert("b".to_string(), late.deadline_at + 1);
        fails_502(decide(status(500, None), &late, &unavailable));
    }

    #[test]
    fn spent_providers_are_those_left_after_failures_other_than_429() {
        let attempt = |provider: &str, outcome: &str, status_code: Option<i64>| Attempt {
            job_id: "j".into(),
            n: 1,
            provider: provider.into(),
            model: "m".into(),
            instance: "i".into(),
            started_at: 0,
            finished_at: Some(1),
            status_code,
            outcome: outcome.into(),
            error: None,
            tokens: 0,
        };
        let attempts = [
            attempt("a", "retry", Some(500)),
            attempt("a", "hop", Some(500)),
            attempt("b", "hop", Some(429)),
            attempt("c", "hop", None),
            attempt("d", "cooldown", Some(429)),
            attempt("e", "lost", None),
            attempt("f", "running", None),
        ];
        let spent = spent_providers(&attempts);
        let mut spent: Vec<&str> = spent.iter().map(String::as_str).collect();
        spent.sort_unstable();
        assert_eq!(spent, ["a", "c"]);
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for _ in 0..50 {
            let b1 = backoff(1).as_millis();
            assert!((100..=200).contains(&b1), "{b1}");
            let b3 = backoff(3).as_millis();
            assert!((400..=800).contains(&b3), "{b3}");
            assert!(backoff(30).as_millis() <= 20_000);
        }
    }
}
