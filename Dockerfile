# llm-orch: multi-stage build. The builder compiles a release binary; the runtime image
# holds only that binary, the config folder and CA certificates. TLS is rustls (reqwest and
# sqlx), so the runtime needs no OpenSSL.

FROM rust:1.95-bookworm AS builder
# aws-lc-rs (rustls' crypto) is C code built with cc; cmake is its fallback build path.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
# The workspace names the benchmark crate, so its manifest must be there too (a stub
# main is enough: only the gateway is built).
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked --bin llm-orch \
    && rm -rf src
COPY src ./src
# sqlx::migrate! embeds the migrations at compile time (build.rs: a new one rebuilds).
COPY build.rs ./
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin llm-orch

FROM debian:bookworm-slim AS runtime
# CA certificates: upstream providers are reached over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin orch \
    && mkdir -p /app/data /app/metrics \
    && chown -R orch:orch /app
WORKDIR /app
COPY --from=builder /src/target/release/llm-orch /usr/local/bin/llm-orch
COPY config ./config
USER orch
ENV ORCH_CONFIG_DIR=/app/config \
    ORCH_BIND=0.0.0.0:31001 \
    ORCH_METRICS_DIR=/app/metrics \
    ORCH_DATABASE_URL=sqlite:///app/data/orch.db
EXPOSE 31001
ENTRYPOINT ["llm-orch"]
CMD ["serve"]
