# botrelay: multi-stage build. The builder compiles the same release binary as
# `cargo build --release --locked`; the runtime image is Debian slim with CA certificates,
# a non-root user, and /data for the embedded SQLite store.
#
#   docker build -t botrelay .
#   docker run --name botrelay -p 8080:8080 -v botrelay-data:/data \
#     -e BOTRELAY__MESSENGER__APP_SECRET=... -e BOTRELAY__MESSENGER__VERIFY_TOKEN=... \
#     -e BOTRELAY__BOT__URL=http://my-bot:3000/webhook botrelay

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# The bundled SQLite and mimalloc are C: the slim image has gcc via build-essential only when asked.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin botrelay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin botrelay \
    && mkdir -p /data /etc/botrelay && chown botrelay /data
COPY --from=builder /src/target/release/botrelay /usr/local/bin/botrelay
COPY config/botrelay.example.toml /etc/botrelay/botrelay.example.toml
USER botrelay
WORKDIR /data
VOLUME ["/data"]
# Public listener (Meta, the bot) and admin listener (metrics, dead letters).
EXPOSE 8080 9091
# Config comes from the environment (BOTRELAY__SECTION__KEY); a file can be mounted and named
# with -e BOTRELAY_CONFIG=/etc/botrelay/botrelay.toml. The admin listener binds all interfaces
# inside the container so that `-p 9091:9091` works: publish it only on a private network, and
# set BOTRELAY__ADMIN__TOKEN (without it, /admin answers only inside the container).
ENV BOTRELAY__STORE__PATH=/data/botrelay.db \
    BOTRELAY__SERVER__LISTEN=0.0.0.0:8080 \
    BOTRELAY__ADMIN__LISTEN=0.0.0.0:9091 \
    BOTRELAY__LOG__FORMAT=json
# Ready = GET /readyz on server.listen answers 200 (the store is writable); the slim image has
# no curl, so the binary asks itself.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/botrelay", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/botrelay"]
CMD ["serve"]
