-- Accept and lease in one round trip and one commit (`QueueStore::insert_and_lease`):
-- inserts a job unless its idempotency key repeats, and when it was new leases exactly as
-- `orch_lease` does, all in the calling statement's own transaction. On a repeated key it
-- returns no row and writes nothing. When another transaction holds the provider's lease
-- lock it does not wait for it (under load that would queue every request behind every
-- other's commit): the job is inserted, and one row with `u_limit = -1` says that nothing
-- was leased, so the pool leases it with others.
CREATE FUNCTION orch_insert_and_lease(
    p_id text, p_task text, p_priority bigint, p_chain text, p_hop bigint, p_job_provider text,
    p_request text, p_stream bigint, p_caller text, p_idempotency_key text,
    p_pinned_instance text, p_created_at bigint, p_deadline_at bigint, p_batch_id text,
    p_custom_id text,
    p_provider text, p_instance text, p_model text, p_lease_ms bigint, p_max_jobs bigint,
    p_rpm bigint, p_concurrency bigint, p_tpm bigint, p_window_ms bigint
) RETURNS TABLE (
    u_now bigint, u_cooldown_until bigint, u_breaker_open_until bigint, u_running bigint,
    u_calls bigint, u_tokens bigint, u_oldest bigint, u_limit bigint, u_next_due bigint, job jobs
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO jobs (id, task, status, priority, chain, hop, provider, request, stream, caller,
        idempotency_key, pinned_instance, run_at, deadline_at, created_at, batch_id, custom_id)
    VALUES (p_id, p_task, 'queued', p_priority, p_chain, p_hop, p_job_provider, p_request,
        p_stream, p_caller, p_idempotency_key, p_pinned_instance, p_created_at, p_deadline_at,
        p_created_at, p_batch_id, p_custom_id)
    ON CONFLICT (caller, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT pg_try_advisory_xact_lock(1869767528, hashtext(p_provider)) THEN
        u_now := (extract(epoch from clock_timestamp()) * 1000)::bigint;
        u_cooldown_until := 0; u_breaker_open_until := 0; u_running := 0; u_calls := 0;
        u_tokens := 0; u_limit := -1;
        RETURN NEXT;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM orch_lease(p_provider, p_instance, p_model, p_lease_ms,
        p_max_jobs, p_rpm, p_concurrency, p_tpm, p_window_ms, true);
END $$;
