//! The OpenAI Files + Batch API over the job queue: through the real async-openai client,
//! and through raw HTTP to hold the exact JSON shapes.

use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::batches::{
    BatchCompletionWindow, BatchEndpoint, BatchRequestArgs, BatchRequestOutput, BatchStatus,
};
use async_openai::types::files::{CreateFileRequestArgs, FileInput, FilePurpose};
use serde_json::{Value, json};

use crate::support::*;

/// One input line.
fn line(custom_id: &str, model: &str, text: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    })
    .to_string()
}

fn jsonl(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

/// A multipart/form-data body: `(name, filename, content)` per part.
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "orchtestboundary7d1f";
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Raw HTTP with an optional key.
struct Api<'a> {
    app: &'a TestApp,
    key: Option<&'a str>,
}

impl<'a> Api<'a> {
    fn new(app: &'a TestApp) -> Self {
        Self { app, key: None }
    }
    fn key(app: &'a TestApp, key: &'a str) -> Self {
        Self {
            app,
            key: Some(key),
        }
    }
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .app
            .http
            .request(method, format!("{}{path}", self.app.url));
        match self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }
    async fn send(&self, r: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.req(reqwest::Method::GET, path)).await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.req(reqwest::Method::POST, path).json(&body))
            .await
    }
    async fn upload_parts(&self, parts: &[(&str, Option<&str>, &[u8])]) -> (u16, Value) {
        let (ct, body) = form(parts);
        self.send(
            self.req(reqwest::Method::POST, "/v1/files")
                .header("content-type", ct)
                .body(body),
        )
        .await
    }
    async fn upload(&self, content: &str) -> String {
        let (status, file) = self
            .upload_parts(&[
                ("purpose", None, b"batch"),
                ("file", Some("in.jsonl"), content.as_bytes()),
            ])
            .await;
        assert_eq!(status, 200, "{file}");
        file["id"].as_str().unwrap().to_string()
    }
    async fn create(&self, file_id: &str, metadata: Value) -> (u16, Value) {
        self.post(
            "/v1/batches",
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": metadata}),
        )
        .await
    }
    async fn content(&self, file_id: &str) -> Vec<Value> {
        let resp = self
            .req(
                reqwest::Method::GET,
                &format!("/v1/files/{file_id}/content"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    /// Polls a batch until it reaches one of `statuses`; returns every status seen.
    async fn wait(&self, id: &str, statuses: &[&str], within: Duration) -> (Value, Vec<String>) {
        let end = Instant::now() + within;
        let mut seen: Vec<String> = vec![];
        loop {
            let (code, b) = self.get(&format!("/v1/batches/{id}")).await;
            assert_eq!(code, 200, "{b}");
            let s = b["status"].as_str().unwrap().to_string();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            if statuses.contains(&s.as_str()) {
                return (b, seen);
            }
            assert!(Instant::now() < end, "batch {id} stuck: {b}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}

async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gateway with one provider `up` at `fake`, on SQLite or on the Postgres `db`.
async fn app_with_up(fake: &FakeOpenAi, db: Option<&crate::support::pg::TestDb>) -> TestApp {
    let mut opts = Options::new(
        openai_provider("up", &fake.base_url(), "concurrency = 4"),
        router_yaml(&["up"], ""),
    );
    if let Some(db) = db {
        opts = opts.env("ORCH_DATABASE_URL", &db.url);
    }
    spawn_app(opts).await
}

#[tokio::test]
async fn the_async_openai_client_runs_a_batch_end_to_end() {
    let fake = FakeOpenAi::start().await;
    end_to_end(&app_with_up(&fake, None).await).await;
}

#[tokio::test]
async fn the_async_openai_client_runs_a_batch_end_to_end_on_postgres() {
    let db = crate::support::pg::TestDb::create().await;
    let fake = FakeOpenAi::start().await;
    end_to_end(&app_with_up(&fake, Some(&db)).await).await;
}

async fn end_to_end(app: &TestApp) {
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_key("unused")
            .with_api_base(format!("{}/v1", app.url)),
    );
    let input = jsonl(
        &(0..5)
            .map(|i| line(&format!("r{i}"), "gpt-x", &format!("q{i}")))
            .collect::<Vec<_>>(),
    );
    let file = client
        .files()
        .create(
            CreateFileRequestArgs::default()
                .file(FileInput::from_vec_u8(
                    "input.jsonl".into(),
                    input.clone().into_bytes(),
                ))
                .purpose(FilePurpose::Batch)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(file.filename, "input.jsonl");
    assert_eq!(file.bytes, Some(input.len() as u32));
    let batch = client
        .batches()
        .create(
            BatchRequestArgs::default()
                .input_file_id(file.id.clone())
                .endpoint(BatchEndpoint::V1ChatCompletions)
                .completion_window(BatchCompletionWindow::W24H)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let b = client.batches().retrieve(&batch.id).await.unwrap();
        if b.status == BatchStatus::Completed {
            break b;
        }
        assert!(Instant::now() < end, "batch did not complete: {b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counts = done.request_counts.unwrap();
    assert_eq!((counts.total, counts.completed, counts.failed), (5, 5, 0));
    assert!(done.error_file_id.is_none());
    let out = client
        .files()
        .content(&done.output_file_id.unwrap())
        .await
        .unwrap();
    let lines: Vec<BatchRequestOutput> = std::str::from_utf8(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
    assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4"]);
    let r = lines[2].response.as_ref().unwrap();
    assert_eq!(r.status_code, 200);
    assert_eq!(r.body["choices"][0]["message"]["content"], "fake:q2");
    let listed = client.batches().list().await.unwrap();
    assert_eq!(listed.data.len(), 1);
    let deleted = client.files().delete(&file.id).await.unwrap();
    assert!(deleted.deleted);
}

#[tokio::test]
async fn shapes_counts_order_error_file_and_routes_per_line() {
    let up = FakeOpenAi::start().await;
    let bad = FakeOpenAi::start().await;
    let fast = FakeOpenAi::start().await;
    bad.script([Reply::status(400)]);
    let providers = [
        openai_provider("up", &up.base_url(), "concurrency = 2"),
        openai_provider("bad", &bad.base_url(), ""),
        openai_provider("fast", &fast.base_url(), ""),
    ]
    .join("\n");
    let routes = "  FAST:\n    primary: fast\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["up"], routes))).await;
    let api = Api::new(&app);

    // Line b goes to provider `bad` by its model, which answers 400 (not retried).
    let input = jsonl(&[
        line("a", "gpt-x", "one"),
        line("b", "bad", "two"),
        line("c", "gpt-x", "three"),
    ]);
    let (code, file) = api
        .upload_parts(&[
            ("file", Some("mine.jsonl"), input.as_bytes()),
            ("purpose", None, b"batch"),
        ])
        .await;
    assert_eq!(code, 200, "{file}");
    let file_id = file["id"].as_str().unwrap();
    assert!(file_id.starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], input.len());
    assert_eq!(file["filename"], "mine.jsonl");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    assert!(file["created_at"].as_i64().unwrap() > 1_600_000_000);
    assert_eq!(api.get(&format!("/v1/files/{file_id}")).await.1, file);

    let (code, created) = api.create(file_id, json!({"note": "x"})).await;
    assert_eq!(code, 200, "{created}");
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("batch_"));
    assert_eq!(created["object"], "batch");
    assert_eq!(created["endpoint"], "/v1/chat/completions");
    assert_eq!(created["completion_window"], "24h");
    assert_eq!(created["input_file_id"], file_id);
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["metadata"], json!({"note": "x"}));
    assert_eq!(created["errors"], Value::Null);
    assert_eq!(
        created["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 0})
    );
    let created_at = created["created_at"].as_i64().unwrap();
    assert_eq!(
        created["expires_at"].as_i64().unwrap(),
        created_at + 24 * 3600
    );
    assert!(created["in_progress_at"].is_i64());
    for k in [
        "completed_at",
        "finalizing_at",
        "failed_at",
        "cancelled_at",
        "output_file_id",
        "error_file_id",
    ] {
        assert!(created[k].is_null(), "{k}: {created}");
    }

    let (done, seen) = api.wait(id, &["completed"], Duration::from_secs(30)).await;
    assert!(
        seen.iter()
            .all(|s| ["in_progress", "finalizing", "completed"].contains(&s.as_str())),
        "{seen:?}"
    );
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );
    assert!(done["finalizing_at"].is_i64() && done["completed_at"].is_i64());

    let out_id = done["output_file_id"].as_str().unwrap();
    let (_, out_file) = api.get(&format!("/v1/files/{out_id}")).await;
    assert_eq!(out_file["purpose"], "batch_output");
    let out = api.content(out_id).await;
    assert_eq!(
        out.iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["a", "c"]
    );
    let first = &out[0];
    assert!(first["id"].as_str().unwrap().starts_with("batch_req_"));
    assert_eq!(first["error"], Value::Null);
    assert_eq!(first["response"]["status_code"], 200);
    assert!(
        first["response"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("job_")
    );
    assert_eq!(first["response"]["body"]["object"], "chat.completion");
    assert_eq!(
        first["response"]["body"]["choices"][0]["message"]["content"],
        "fake:one"
    );

    let errs = api.content(done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["custom_id"], "b");
    assert_eq!(errs[0]["response"]["status_code"], 400);
    assert!(
        errs[0]["response"]["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fake upstream error 400")
    );
    assert!(errs[0]["error"]["code"].is_string());
    assert_eq!(bad.call_count(), 1, "a 4xx line is not retried");

    // The batch's metadata names a route: every line takes it, whatever its model.
    let f2 = api
        .upload(&jsonl(&[line("x", "bad", "hi"), line("y", "gpt-x", "ho")]))
        .await;
    let (_, b2) = api.create(&f2, json!({"x-orch-task-kind": "FAST"})).await;
    let (done2, _) = api
        .wait(
            b2["id"].as_str().unwrap(),
            &["completed"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        done2["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    assert_eq!(fast.call_count(), 2);
    assert_eq!(bad.call_count(), 1);

    // Jobs of batch lines are ordinary jobs, visible to their owner.
    let job_id = first["response"]["request_id"].as_str().unwrap();
    let (code, job) = api.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(code, 200);
    assert_eq!(job["batch_id"], id);
}

#[tokio::test]
async fn batch_lines_yield_to_interactive_requests() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(150));
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "concurrency = 1"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let api = Api::new(&app);
    let input = jsonl(
        &(0..20)
            .map(|i| line(&format!("l{i}"), "gpt-x", &format!("batch {i}")))
            .collect::<Vec<_>>(),
    );
    let file = api.upload(&input).await;
    let (_, batch) = api.create(&file, Value::Null).await;
    let f = fake.clone();
    wait_until("the first batch call", Duration::from_secs(10), move || {
        f.call_count() >= 1
    })
    .await;
    let resp = app.chat(user("interactive")).await;
    assert_eq!(resp.status(), 200);
    let calls = fake.calls();
    let pos = calls
        .iter()
        .position(|c| c.body["messages"][0]["content"] == "interactive")
        .unwrap();
    assert!(
        pos < 5,
        "the interactive request was call #{pos} of a 20-line batch"
    );
    api.wait(
        batch["id"].as_str().unwrap(),
        &["completed"],
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test]
async fn list_pages_newest_first() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["dummy_a"], ""))).await;
    let api = Api::new(&app);
    let file = api.upload(&jsonl(&[line("a", "m", "hi")])).await;
    let mut ids = vec![];
    for _ in 0..3 {
        let (code, b) = api.create(&file, Value::Null).await;
        assert_eq!(code, 200, "{b}");
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    let (code, page) = api.get("/v1/batches?limit=2").await;
    assert_eq!(code, 200);
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], true);
    let got: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(page["first_id"], ids[2]);
    assert_eq!(page["last_id"], ids[1]);
    let (_, rest) = api
        .get(&format!("/v1/batches?limit=2&after={}", ids[1]))
        .await;
    assert_eq!(rest["has_more"], false);
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0]["id"], ids[0]);
    let (_, all) = api.get("/v1/batches").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3);
    assert_eq!(api.get("/v1/batches?limit=0").await.0, 400);
}

/// `GET /v1/files` takes OpenAI's `order`: `desc` (newest first) by default, `asc` oldest
/// first, each paging with `after` in its own direction.
#[tokio::test]
async fn files_list_in_either_order() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["dummy_a"], ""))).await;
    let api = Api::new(&app);
    let mut ids = vec![];
    for n in 0..3 {
        ids.push(
            api.upload(&jsonl(&[line(&format!("l{n}"), "m", "hi")]))
                .await,
        );
    }
    let page_ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap().to_string())
            .collect()
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    for path in ["/v1/files", "/v1/files?order=desc"] {
        let (code, page) = api.get(path).await;
        assert_eq!(code, 200, "{page}");
        assert_eq!(page_ids(&page), newest_first, "{path}");
    }
    let (code, page) = api.get("/v1/files?order=asc&limit=2").await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page_ids(&page), ids[..2]);
    assert_eq!(page["has_more"], true);
    let (_, rest) = api
        .get(&format!("/v1/files?order=asc&limit=2&after={}", ids[1]))
        .await;
    assert_eq!(page_ids(&rest), ids[2..]);
    assert_eq!(rest["has_more"], false);
    let (code, err) = api.get("/v1/files?order=oldest").await;
    assert_eq!(code, 400);
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert_eq!(err["error"]["param"], "order");
}

#[tokio::test]
async fn cancel_stops_queued_lines_and_keeps_what_finished() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(400));
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "concurrency = 1"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let api = Api::new(&app);
    let input = jsonl(
        &(0..6)
            .map(|i| line(&format!("c{i}"), "gpt-x", "slow"))
            .collect::<Vec<_>>(),
    );
    let file = api.upload(&input).await;
    let (_, batch) = api.create(&file, Value::Null).await;
    let id = batch["id"].as_str().unwrap();
    let f = fake.clone();
    wait_until("a running line", Duration::from_secs(10), move || {
        f.in_flight() >= 1
    })
    .await;
    let (code, cancelling) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(code, 200, "{cancelling}");
    assert!(["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()));
    assert!(cancelling["cancelling_at"].is_i64());
    let (done, _) = api.wait(id, &["cancelled"], Duration::from_secs(20)).await;
    assert!(done["cancelled_at"].is_i64());
    let completed = done["request_counts"]["completed"].as_i64().unwrap();
    assert!((1..6).contains(&completed), "{done}");
    assert_eq!(
        done["request_counts"]["failed"], 0,
        "lines stopped by the cancel are not failures"
    );
    let out = api.content(done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() as i64, completed);
    let errs = api.content(done["error_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() + errs.len(), 6);
    assert!(
        errs.iter()
            .all(|l| l["error"]["code"] == "batch_cancelled" && l["response"].is_null())
    );
    assert!(fake.call_count() < 6);
    // Cancelling again is harmless; a finished batch cannot be cancelled.
    assert_eq!(
        api.post(&format!("/v1/batches/{id}/cancel"), json!({}))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn another_key_sees_no_file_and_no_batch() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(
        Options::new(providers, router_yaml(&["dummy_a"], ""))
            .env("ORCH_INBOUND_API_KEYS", "k1,k2"),
    )
    .await;
    let (one, two) = (Api::key(&app, "k1"), Api::key(&app, "k2"));
    let file = one.upload(&jsonl(&[line("a", "m", "hi")])).await;
    let (_, batch) = one.create(&file, Value::Null).await;
    let id = batch["id"].as_str().unwrap();
    for path in [
        format!("/v1/files/{file}"),
        format!("/v1/files/{file}/content"),
        format!("/v1/batches/{id}"),
    ] {
        let (code, body) = two.get(&path).await;
        assert_eq!(code, 404, "{path}: {body}");
        assert_eq!(body["error"]["type"], "not_found_error");
        assert_eq!(one.get(&path).await.0, 200, "{path}");
    }
    assert_eq!(
        two.post(&format!("/v1/batches/{id}/cancel"), json!({}))
            .await
            .0,
        404
    );
    let (code, body) = two.create(&file, Value::Null).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["param"], "input_file_id");
    let del = two
        .send(two.req(reqwest::Method::DELETE, &format!("/v1/files/{file}")))
        .await;
    assert_eq!(del.0, 404);
    assert_eq!(two.get("/v1/batches").await.1["data"], json!([]));
    assert_eq!(two.get("/v1/files").await.1["data"], json!([]));
    assert_eq!(Api::new(&app).get("/v1/batches").await.0, 401);
    let del = one
        .send(one.req(reqwest::Method::DELETE, &format!("/v1/files/{file}")))
        .await;
    assert_eq!(
        del,
        (200, json!({"id": file, "object": "file", "deleted": true}))
    );
    assert_eq!(one.get(&format!("/v1/files/{file}")).await.0, 404);
}

#[tokio::test]
async fn bad_uploads_and_bad_batches_name_the_problem() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["dummy_a"], ""))).await;
    let api = Api::new(&app);
    let good = jsonl(&[line("a", "m", "hi")]);
    // (form parts, the param named, a word of the message)
    type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);
    let cases: Vec<(Vec<Part>, &str, &str)> = vec![
        (
            vec![
                ("purpose", None, b"fine-tune"),
                ("file", Some("f.jsonl"), good.as_bytes()),
            ],
            "purpose",
            "batch",
        ),
        (
            vec![("file", Some("f.jsonl"), good.as_bytes())],
            "purpose",
            "purpose",
        ),
        (vec![("purpose", None, b"batch")], "file", "file"),
        (
            vec![
                ("purpose", None, b"batch"),
                ("file", Some("f.csv"), b"a,b\n1,2\n"),
            ],
            "file",
            "JSONL",
        ),
        (
            vec![
                ("purpose", None, b"batch"),
                ("file", Some("f.jsonl"), b"[1]\n"),
            ],
            "file",
            "line 1",
        ),
        (
            vec![
                ("purpose", None, b"batch"),
                ("file", Some("f.jsonl"), b"\n\n"),
            ],
            "file",
            "empty",
        ),
    ];
    for (parts, param, says) in cases {
        let (code, body) = api.upload_parts(&parts).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    let (code, body) = api.post("/v1/files", json!({"purpose": "batch"})).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("multipart")
    );

    let (code, body) = api.create("file-nope", Value::Null).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["param"], "input_file_id");
    let file = api.upload(&good).await;
    let (code, body) = api
        .post("/v1/batches", json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "24h"}))
        .await;
    assert_eq!(
        (code, body["error"]["param"].as_str()),
        (400, Some("endpoint"))
    );
    let (code, body) = api
        .post("/v1/batches", json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "1h"}))
        .await;
    assert_eq!(
        (code, body["error"]["param"].as_str()),
        (400, Some("completion_window"))
    );
    assert_eq!(api.get("/v1/batches/batch_nope").await.0, 404);
    // `metadata` within OpenAI's limits: 16 pairs, keys of 64 characters, string values.
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for metadata in [
        Value::Object(many),
        json!({"k".repeat(65): "v"}),
        json!({"k": "v".repeat(513)}),
        json!({"k": 1}),
    ] {
        let (code, body) = api.create(&file, metadata).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(body["error"]["param"], "metadata", "{body}");
    }

    // A file with malformed lines fails the whole batch at validation, every line named.
    let bad = [
        line("ok", "m", "fine"),
        "{not json".to_string(),
        line("ok", "m", "dup"),
        json!({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}})
            .to_string(),
        json!({"custom_id": "m", "method": "GET", "url": "/v1/chat/completions", "body": {}})
            .to_string(),
        json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": "hi"})
            .to_string(),
        json!({"method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(),
    ];
    let file = api
        .upload_parts(&[
            ("purpose", None, b"batch"),
            ("file", Some("b.jsonl"), jsonl(&bad).as_bytes()),
        ])
        .await;
    // Invalid JSON on a line is refused at upload already.
    assert_eq!(file.0, 400);
    let bad: Vec<String> = bad.into_iter().filter(|l| l != "{not json").collect();
    let file = api.upload(&jsonl(&bad)).await;
    let (code, failed) = api.create(&file, Value::Null).await;
    assert_eq!(code, 200, "{failed}");
    assert_eq!(failed["status"], "failed");
    assert!(failed["failed_at"].is_i64());
    assert_eq!(failed["errors"]["object"], "list");
    let errs: Vec<(String, i64, Value)> = failed["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap().to_string(),
                e["line"].as_i64().unwrap(),
                e["param"].clone(),
            )
        })
        .collect();
    assert_eq!(
        errs,
        [
            ("duplicate_custom_id".into(), 2, json!("custom_id")),
            ("invalid_url".into(), 3, json!("url")),
            ("invalid_method".into(), 4, json!("method")),
            ("invalid_request".into(), 5, json!("body")),
            ("invalid_custom_id".into(), 6, json!("custom_id")),
        ]
    );
    assert_eq!(failed["request_counts"]["total"], 0);
    let (_, again) = api
        .get(&format!("/v1/batches/{}", failed["id"].as_str().unwrap()))
        .await;
    assert_eq!(again, failed);
}

/// A well-formed line whose request is invalid fails as that request would on its own:
/// a 400 in the error file, counted as failed, with no upstream call; the other lines run.
#[tokio::test]
async fn a_line_with_an_invalid_request_fails_alone() {
    let up = FakeOpenAi::start().await;
    invalid_requests_fail_alone(&up, &app_with_up(&up, None).await).await;
}

#[tokio::test]
async fn a_line_with_an_invalid_request_fails_alone_on_postgres() {
    let db = crate::support::pg::TestDb::create().await;
    let up = FakeOpenAi::start().await;
    invalid_requests_fail_alone(&up, &app_with_up(&up, Some(&db)).await).await;
}

async fn invalid_requests_fail_alone(up: &FakeOpenAi, app: &TestApp) {
    let api = Api::new(app);
    let request_line = |custom_id: &str, body: Value| {
        json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
            .to_string()
    };
    let input = jsonl(&[
        line("a", "gpt-x", "one"),
        request_line("no-messages", json!({"model": "gpt-x"})),
        request_line(
            "too-hot",
            json!({"model": "gpt-x", "temperature": 3, "messages": [{"role": "user", "content": "x"}]}),
        ),
        request_line(
            "streamed",
            json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
        ),
        line("e", "gpt-x", "five"),
    ]);
    let file = api.upload(&input).await;
    let (code, created) = api.create(&file, Value::Null).await;
    assert_eq!(code, 200, "{created}");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["request_counts"]["total"], 5);
    assert_eq!(created["request_counts"]["failed"], 3);
    let (done, _) = api
        .wait(
            created["id"].as_str().unwrap(),
            &["completed", "failed"],
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 2, "failed": 3})
    );
    // Only the two good lines reached the upstream.
    assert_eq!(up.call_count(), 2);
    let output = api.content(done["output_file_id"].as_str().unwrap()).await;
    let ok: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ok, ["a", "e"]);
    let errors = api.content(done["error_file_id"].as_str().unwrap()).await;
    let failed: Vec<(&str, &Value, &Value, &Value)> = errors
        .iter()
        .map(|l| {
            let body = &l["response"]["body"]["error"];
            (
                l["custom_id"].as_str().unwrap(),
                &l["response"]["status_code"],
                &body["type"],
                &body["param"],
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            (
                "no-messages",
                &json!(400),
                &json!("invalid_request_error"),
                &json!("messages")
            ),
            (
                "too-hot",
                &json!(400),
                &json!("invalid_request_error"),
                &json!("temperature")
            ),
            (
                "streamed",
                &json!(400),
                &json!("invalid_request_error"),
                &json!("stream")
            ),
        ]
    );
    // Each is a finished job, as GET /v1/jobs shows it.
    let job = app
        .job(errors[0]["response"]["request_id"].as_str().unwrap())
        .await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], json!([]));
}

#[tokio::test]
async fn a_file_that_starts_with_a_byte_order_mark_runs() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["dummy_a"], ""))).await;
    let api = Api::new(&app);
    let file = api
        .upload(&format!("\u{feff}{}", jsonl(&[line("a", "m", "hi")])))
        .await;
    let (code, batch) = api.create(&file, Value::Null).await;
    assert_eq!(code, 200, "{batch}");
    let (done, _) = api
        .wait(
            batch["id"].as_str().unwrap(),
            &["completed", "failed"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let out = api.content(done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out[0]["custom_id"], "a");
}

#[tokio::test]
async fn a_batch_survives_a_restart() {
    let fake = FakeOpenAi::start().await;
    fake.set_latency(Duration::from_millis(300));
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), "concurrency = 1"),
        router_yaml(&["up"], ""),
    ))
    .await;
    let api = Api::new(&app);
    let input = jsonl(
        &(0..6)
            .map(|i| line(&format!("s{i}"), "gpt-x", &format!("r{i}")))
            .collect::<Vec<_>>(),
    );
    let file = api.upload(&input).await;
    let (_, batch) = api.create(&file, Value::Null).await;
    let id = batch["id"].as_str().unwrap().to_string();
    let f = fake.clone();
    wait_until("two calls", Duration::from_secs(10), move || {
        f.call_count() >= 2
    })
    .await;
    let (dir, env) = app.stop().await;
    fake.set_latency(Duration::from_millis(10));

    let app = start_in(dir, env).await;
    let api = Api::new(&app);
    let (done, _) = api.wait(&id, &["completed"], Duration::from_secs(30)).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 6, "failed": 0})
    );
    let out = api.content(done["output_file_id"].as_str().unwrap()).await;
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["s0", "s1", "s2", "s3", "s4", "s5"]);
}

#[tokio::test]
async fn uploads_have_their_own_limit_above_the_body_limit() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(
        Options::new(providers, router_yaml(&["dummy_a"], "")).env("ORCH_MAX_BODY_BYTES", "4096"),
    )
    .await;
    let api = Api::new(&app);
    // 3 MB: past the 4 KB body limit and axum's 2 MB default, far below 200 MB.
    let big = line("big", "m", &"x".repeat(3 * 1024 * 1024));
    let file = api.upload(&jsonl(&[big])).await;
    let (code, b) = api.create(&file, Value::Null).await;
    assert_eq!(code, 200, "{b}");
    let (code, body) = api
        .post("/v1/chat/completions", user(&"y".repeat(8192)))
        .await;
    assert_eq!(code, 413, "{body}");
}
