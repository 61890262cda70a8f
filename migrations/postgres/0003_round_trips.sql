-- The hot paths of a request (lease, end of an attempt) as functions: one round trip
-- each, in the statement's own transaction, instead of BEGIN, five statements, COMMIT.
-- Each statement inside a (volatile) function takes a fresh snapshot, as the separate
-- statements did, so what the lease reads after taking its lock is current.

-- The budget rule of src/queue/budget.rs (`admit`), as the number of jobs that may be
-- leased now; 0 when blocked. Rust stays the reference: the lease re-runs `admit` on the
-- usage this function saw and reports a disagreement, and a unit test compares both on
-- a grid of inputs.
CREATE FUNCTION orch_admit(
    cooldown_until bigint, breaker_open_until bigint, running bigint, calls bigint,
    tokens bigint, now_ms bigint, rpm bigint, concurrency bigint, tpm bigint, max_jobs bigint
) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN cooldown_until > now_ms OR breaker_open_until > now_ms THEN 0
        WHEN concurrency - running <= 0 OR rpm - calls <= 0 THEN 0
        WHEN tpm IS NOT NULL AND tokens >= tpm THEN 0
        -- Token use is only known per call: one at a time under tpm.
        WHEN tpm IS NOT NULL THEN 1
        ELSE LEAST(concurrency - running, rpm - calls, GREATEST(max_jobs, 1))
    END
$$;

-- A lease: takes the provider's advisory lock (held until the transaction ends), reads
-- its usage, decides how many jobs it may take and picks them (`FOR UPDATE SKIP LOCKED`).
-- With `p_write` (providers without tpm: no token estimate to book) it also marks them
-- running, opens their attempts and counts the calls in the rate bucket, and returns the
-- rows as they are now. Without it (tpm: the caller estimates tokens per job, in an
-- explicit transaction) it returns the picked rows unchanged and writes nothing.
-- Every row carries the usage read; when no job is taken there is one row whose `job`
-- is NULL, with the earliest not-yet-due run_at when the budget allowed a lease.
CREATE FUNCTION orch_lease(
    p_provider text, p_instance text, p_model text, p_lease_ms bigint, p_max_jobs bigint,
    p_rpm bigint, p_concurrency bigint, p_tpm bigint, p_window_ms bigint, p_write boolean
) RETURNS TABLE (
    u_now bigint, u_cooldown_until bigint, u_breaker_open_until bigint, u_running bigint,
    u_calls bigint, u_tokens bigint, u_oldest bigint, u_limit bigint, u_next_due bigint, job jobs
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Serialise the leases of this provider across every instance until commit: the
    -- counts read below stay true until our own leases are written.
    PERFORM pg_advisory_xact_lock(1869767528, hashtext(p_provider));
    u_now := (extract(epoch from clock_timestamp()) * 1000)::bigint;
    SELECT COALESCE(s.cooldown_until, 0), COALESCE(s.breaker_open_until, 0)
        INTO u_cooldown_until, u_breaker_open_until
        FROM (SELECT 1) one LEFT JOIN provider_state s ON s.provider = p_provider;
    SELECT count(*) INTO u_running FROM jobs WHERE provider = p_provider AND status = 'running';
    SELECT COALESCE(sum(w.calls), 0)::bigint, COALESCE(sum(w.tokens), 0)::bigint, min(w.second)
        INTO u_calls, u_tokens, u_oldest
        FROM provider_usage w
        WHERE w.provider = p_provider AND w.second >= floor((u_now - p_window_ms) / 1000.0)::bigint;
    u_limit := orch_admit(u_cooldown_until, u_breaker_open_until, u_running, u_calls, u_tokens,
                          u_now, p_rpm, p_concurrency, p_tpm, p_max_jobs);
    u_next_due := NULL;
    IF u_limit > 0 THEN
        IF p_write THEN
            RETURN QUERY
            WITH p AS (
                SELECT j.id FROM jobs j
                WHERE j.provider = p_provider AND j.status = 'queued' AND j.run_at <= u_now
                  AND (j.pinned_instance IS NULL OR j.pinned_instance = p_instance)
                ORDER BY j.priority, j.run_at LIMIT u_limit
                FOR UPDATE SKIP LOCKED
            ), u AS (
                UPDATE jobs j SET status = 'running', lease_owner = p_instance,
                    lease_expires_at = u_now + p_lease_ms, started_at = COALESCE(j.started_at, u_now),
                    attempt_count = j.attempt_count + 1, hop_tries = j.hop_tries + 1
                FROM p WHERE j.id = p.id
                RETURNING j
            ), a AS (
                INSERT INTO attempts (job_id, n, provider, model, instance, started_at, outcome, tokens)
                SELECT (u.j).id, (u.j).attempt_count, p_provider, p_model, p_instance, u_now, 'running', 0
                FROM u
            ), b AS (
                INSERT INTO provider_usage AS pu (provider, second, calls, tokens)
                SELECT p_provider, u_now / 1000, count(*), 0 FROM u HAVING count(*) > 0
                ON CONFLICT (provider, second) DO UPDATE SET calls = pu.calls + EXCLUDED.calls
            )
            SELECT u_now, u_cooldown_until, u_breaker_open_until, u_running, u_calls, u_tokens,
                   u_oldest, u_limit, NULL::bigint, u.j
            FROM u ORDER BY (u.j).priority, (u.j).run_at;
        ELSE
            RETURN QUERY
            SELECT u_now, u_cooldown_until, u_breaker_open_until, u_running, u_calls, u_tokens,
                   u_oldest, u_limit, NULL::bigint, j
            FROM jobs j
            WHERE j.provider = p_provider AND j.status = 'queued' AND j.run_at <= u_now
              AND (j.pinned_instance IS NULL OR j.pinned_instance = p_instance)
            ORDER BY j.priority, j.run_at LIMIT u_limit
            FOR UPDATE SKIP LOCKED;
        END IF;
        IF FOUND THEN
            RETURN;
        END IF;
        SELECT min(j.run_at) INTO u_next_due FROM jobs j
        WHERE j.provider = p_provider AND j.status = 'queued'
          AND (j.pinned_instance IS NULL OR j.pinned_instance = p_instance);
    END IF;
    job := NULL;
    RETURN NEXT;
END
$$;

-- The end of an attempt: the attempt, the job's move (only by the lease holder of that
-- attempt) and the provider's shared state, in the statement's transaction (the news
-- for other instances follow it: see `News` in src/queue/postgres.rs). `p_kind`: 'succeed' | 'fail' | 'requeue'. Returns whether the
-- job moved (false: it was no longer ours; only the attempt was written).
CREATE FUNCTION orch_finish(
    p_job_id text, p_attempt_n bigint, p_instance text, p_provider text, p_finished_at bigint,
    p_outcome text, p_status_code bigint, p_error text, p_tokens bigint, p_count_tokens boolean,
    p_kind text, p_result text, p_usage_prompt bigint, p_usage_completion bigint,
    p_job_status_code bigint, p_job_error text, p_run_at bigint, p_hop bigint, p_to_provider text,
    p_effect boolean, p_cooldown_until bigint, p_success boolean, p_threshold bigint, p_open_ms bigint
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id text;
BEGIN
    IF p_count_tokens AND p_tokens IS NOT NULL THEN
        -- Replace the lease-time estimate by what the call really used, in the bucket of
        -- the second the call started.
        UPDATE provider_usage u SET tokens = u.tokens + p_tokens - a.tokens FROM attempts a
        WHERE a.job_id = p_job_id AND a.n = p_attempt_n AND u.provider = p_provider
          AND u.second = a.started_at / 1000;
    END IF;
    UPDATE attempts SET finished_at = p_finished_at, status_code = p_status_code,
        outcome = p_outcome, error = p_error, tokens = COALESCE(p_tokens, tokens)
    WHERE job_id = p_job_id AND n = p_attempt_n;
    -- Only the lease holder may move the job on, and only for the attempt it holds: after
    -- a lost lease the same instance may hold a newer attempt of the same job.
    IF p_kind = 'succeed' THEN
        UPDATE jobs SET status = 'succeeded', finished_at = p_finished_at, status_code = 200,
            result = p_result, usage_prompt = p_usage_prompt, usage_completion = p_usage_completion,
            lease_owner = NULL, lease_expires_at = NULL, finished_by = p_instance
        WHERE id = p_job_id AND status = 'running' AND lease_owner = p_instance
          AND attempt_count = p_attempt_n
        RETURNING id INTO v_id;
    ELSIF p_kind = 'fail' THEN
        UPDATE jobs SET status = 'failed', finished_at = p_finished_at,
            status_code = p_job_status_code, error = p_job_error, result = p_result,
            lease_owner = NULL, lease_expires_at = NULL, finished_by = p_instance
        WHERE id = p_job_id AND status = 'running' AND lease_owner = p_instance
          AND attempt_count = p_attempt_n
        RETURNING id INTO v_id;
    ELSIF p_kind = 'requeue' THEN
        UPDATE jobs SET status = 'queued', run_at = p_run_at,
            hop_tries = CASE WHEN hop = p_hop THEN hop_tries ELSE 0 END, hop = p_hop,
            provider = p_to_provider, hops = hops + CASE WHEN provider <> p_to_provider THEN 1 ELSE 0 END,
            lease_owner = NULL, lease_expires_at = NULL
        WHERE id = p_job_id AND status = 'running' AND lease_owner = p_instance
          AND attempt_count = p_attempt_n
        RETURNING id INTO v_id;
    ELSE
        RAISE EXCEPTION 'orch_finish: unknown transition %', p_kind;
    END IF;
    -- The attempt's effect on its provider's shared state. The breaker opens by the
    -- database clock, like every other time the lease compares against.
    -- An effect that would change nothing (the usual success: no failures counted, no
    -- longer cool-down) is not written: the upsert would lock the provider's one row
    -- until commit and so queue every call's end behind the previous one's WAL flush.
    IF p_effect AND NOT (p_success IS NOT FALSE AND EXISTS (
        SELECT 1 FROM provider_state s
        WHERE s.provider = p_provider AND (p_success IS NULL OR s.consecutive_failures = 0)
          AND COALESCE(p_cooldown_until, 0) <= s.cooldown_until))
    THEN
        INSERT INTO provider_state AS s (provider, cooldown_until, consecutive_failures, breaker_open_until)
        VALUES (p_provider, COALESCE(p_cooldown_until, 0),
            CASE WHEN p_success IS FALSE THEN 1 ELSE 0 END,
            CASE WHEN p_success IS FALSE AND 1 >= p_threshold
                THEN (extract(epoch from clock_timestamp()) * 1000)::bigint + p_open_ms ELSE 0 END)
        ON CONFLICT (provider) DO UPDATE SET
            cooldown_until = GREATEST(s.cooldown_until, EXCLUDED.cooldown_until),
            consecutive_failures = CASE WHEN p_success IS TRUE THEN 0 WHEN p_success IS FALSE
                THEN s.consecutive_failures + 1 ELSE s.consecutive_failures END,
            breaker_open_until = CASE WHEN p_success IS FALSE AND s.consecutive_failures + 1 >= p_threshold
                THEN (extract(epoch from clock_timestamp()) * 1000)::bigint + p_open_ms
                ELSE s.breaker_open_until END;
    END IF;
    RETURN v_id IS NOT NULL;
END
$$;
