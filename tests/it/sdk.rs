//! The gateway through a real OpenAI client library, as users call it.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};

use crate::support::*;

#[tokio::test]
async fn the_async_openai_client_gets_the_dummy_answer() {
    let providers = "[dummy_a]\ntype = \"dummy\"\nmodel = \"dummy-model\"\n";
    let app = spawn_app(Options::new(providers, router_yaml(&["dummy_a"], ""))).await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_key("unused")
            .with_api_base(format!("{}/v1", app.url)),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-4.1-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hi")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let response = client.chat().create(request).await.unwrap();
    assert_eq!(
        response.choices[0].message.content.as_deref(),
        Some("dummy:hi")
    );
    assert!(response.usage.is_some_and(|u| u.total_tokens > 0));
}

#[tokio::test]
async fn the_client_sees_upstream_failures_as_api_errors() {
    let fake = FakeOpenAi::start().await;
    fake.script([Reply::Status {
        status: 404,
        body: r#"{"error":{"message":"The model `nope` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#.into(),
        headers: vec![],
    }]);
    let app = spawn_app(Options::new(
        openai_provider("up", &fake.base_url(), ""),
        router_yaml(&["up"], ""),
    ))
    .await;
    let client = Client::with_config(OpenAIConfig::new().with_api_base(format!("{}/v1", app.url)));
    let request = CreateChatCompletionRequestArgs::default()
        .model("nope")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hi")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let err = client.chat().create(request).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not exist"), "{text}");
}
