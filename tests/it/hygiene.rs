//! The real binary: JSON logs that carry the job id on every line of a job's life, and
//! an upstream key that never leaves the process (logs, answers, job records, metrics,
//! health, database file).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::Reply;
use crate::support::*;

/// Job ids (`job_` + 32 hex digits) mentioned anywhere in `text`.
fn job_ids_in(text: &str) -> Vec<String> {
    let mut ids = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("job_") {
        let tail = &rest[i + 4..];
        let hex: String = tail.chars().take_while(char::is_ascii_hexdigit).collect();
        if hex.len() == 32 {
            ids.push(format!("job_{hex}"));
        }
        rest = tail;
    }
    ids
}

fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line.get(name).and_then(Value::as_str).or_else(|| {
        line.get("span")
            .and_then(|s| s.get(name))
            .and_then(Value::as_str)
    })
}

fn env_for(
    dir: &Path,
    providers: String,
    router: String,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut opts = Options::new(providers, router);
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    prepare(dir, &opts)
}

async fn wait_lines(dir: &Path, n: usize) {
    let end = Instant::now() + Duration::from_secs(15);
    while crate::observability::jsonl_lines(dir).len() < n {
        assert!(Instant::now() < end, "JSONL lines not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn json_logs_carry_the_job_id_and_honour_rust_log() {
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = env_for(
        dir.path(),
        openai_provider(
            "a",
            &fake.base_url(),
            "rpm = 1000\nconcurrency = 4\nmax_retries = 1",
        ),
        router_yaml(&["a"], ""),
        &[
            ("ORCH_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,llm_orch=debug"),
        ],
    );
    let bin = spawn_binary(dir.path(), &env, "log.txt");
    bin.wait_ready(Duration::from_secs(30)).await;
    let http = reqwest::Client::new();
    let chat = |text: &str| {
        http.post(format!("{}/v1/chat/completions", bin.url))
            .json(&user(text))
            .send()
    };
    fake.script([Reply::status(500)]);
    let r = chat("retry").await.unwrap();
    assert_eq!(r.status(), 200);
    let retried = req_id(&r);
    fake.script([Reply::status(500), Reply::status(500)]);
    let r = chat("fail").await.unwrap();
    assert_eq!(r.status(), 502);
    let failed = req_id(&r);
    wait_lines(&dir.path().join("metrics"), 2).await;
    drop(bin);

    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    let mut per_job: HashMap<String, Vec<String>> = HashMap::new();
    for raw in log.lines().filter(|l| !l.trim().is_empty()) {
        let line: Value = serde_json::from_str(raw)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {raw}"));
        assert!(
            line.get("level").is_some() && line.get("timestamp").is_some(),
            "{raw}"
        );
        // Any line that names a job carries that job's id as a field.
        for id in job_ids_in(raw) {
            assert_eq!(
                field(&line, "job_id"),
                Some(id.as_str()),
                "line without job_id: {raw}"
            );
            let msg = line["message"].as_str().unwrap_or("").to_string();
            per_job.entry(id).or_default().push(msg);
        }
    }
    // RUST_LOG=llm_orch=debug shows the debug lines of a job's life.
    let retried_msgs = &per_job[&retried];
    for m in [
        "job accepted",
        "calling upstream",
        "job re-queued",
        "job finished",
    ] {
        assert!(
            retried_msgs.iter().any(|x| x == m),
            "{m} missing: {retried_msgs:?}"
        );
    }
    assert!(per_job[&failed].iter().any(|x| x == "job finished"));
}

#[tokio::test]
async fn a_planted_upstream_key_never_leaves_the_process() {
    const KEY: &str = "sk-planted-Zq7Xw93kLmTT0p";
    let echo401 = FakeOpenAi::start().await;
    echo401.set_fallback(Reply::EchoAuth(401));
    let echo500 = FakeOpenAi::start().await;
    echo500.set_fallback(Reply::EchoAuth(500));
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let auth = "auth_env = \"PLANTED_UPSTREAM_KEY\"\nrpm = 1000\nconcurrency = 4\nmax_retries = 1";
    let providers = format!(
        "{}{}{}",
        openai_provider("echo401", &echo401.base_url(), auth),
        openai_provider("echo500", &echo500.base_url(), auth),
        openai_provider("dead", &dead, auth),
    );
    let router = router_yaml(
        &["echo500", "dead"],
        "  AUTH:\n    primary: echo401\n  NET:\n    primary: dead\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_for(
        dir.path(),
        providers,
        router,
        &[
            ("ORCH_LOG_FORMAT", "json"),
            ("RUST_LOG", "debug,sqlx=info"),
            ("ORCH_INBOUND_API_KEYS", "inbound-key"),
        ],
    );
    env.insert("PLANTED_UPSTREAM_KEY".into(), KEY.into());
    let bin = spawn_binary(dir.path(), &env, "log.txt");
    bin.wait_ready(Duration::from_secs(30)).await;
    let http = reqwest::Client::new();
    let get = |path: String| {
        http.get(format!("{}{path}", bin.url))
            .bearer_auth("inbound-key")
            .send()
    };
    let mut seen = String::new();
    let mut ids = vec![];
    for (task, stream, status) in [
        ("AUTH", false, 401),
        ("DEFAULT", false, 502),
        ("NET", false, 502),
        // A stream that fails before its first chunk answers with the job's status.
        ("DEFAULT", true, 502),
    ] {
        let mut body = user("leak?");
        body["stream"] = json!(stream);
        let r = http
            .post(format!("{}/v1/chat/completions", bin.url))
            .bearer_auth("inbound-key")
            .header("x-orch-task-kind", task)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{task} stream={stream}");
        ids.push(req_id(&r));
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"]["message"].as_str().is_some(), "{text}");
        seen.push_str(&text);
    }
    // The upstreams did get the key (so there was something to leak).
    assert!(
        echo401.calls()[0].headers["authorization"]
            .to_str()
            .unwrap()
            .contains(KEY)
    );
    for id in &ids {
        seen.push_str(
            &get(format!("/v1/jobs/{id}"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    seen.push_str(&get("/metrics".into()).await.unwrap().text().await.unwrap());
    seen.push_str(&get("/healthz".into()).await.unwrap().text().await.unwrap());
    seen.push_str(
        &get("/v1/models".into())
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(
        seen.contains("[redacted]"),
        "the echoed key reached the answers redacted"
    );
    assert!(!seen.contains(KEY), "planted key in an HTTP answer");
    wait_lines(&dir.path().join("metrics"), ids.len()).await;
    drop(bin);

    // Every file the gateway wrote: logs, JSONL, the SQLite database with its WAL.
    let mut files = vec![];
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let needle = KEY.as_bytes();
    let mut checked = 0;
    for f in &files {
        if f.ends_with("config/providers.toml") || f.ends_with("config/router.yaml") {
            continue;
        }
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "planted key found in {}",
            f.display()
        );
        checked += 1;
    }
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    assert!(names.iter().any(|n| n.ends_with("log.txt")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with(".jsonl")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("orch.db")), "{names:?}");
    assert!(checked >= 3);
}
