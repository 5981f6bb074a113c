# syntax=docker/dockerfile:1
#
# Every binary of the workspace, one small image each, selected by target:
#
#   docker build --target cron-connector  -t faas-connectors/cron-connector .
#   docker build --target kafka-connector -t faas-connectors/kafka-connector .
#   docker build --target redis-connector -t faas-connectors/redis-connector .
#   docker build --target sqs-connector   -t faas-connectors/sqs-connector .
#   docker build --target nats-connector  -t faas-connectors/nats-connector .
#   docker build --target rabbitmq-connector -t faas-connectors/rabbitmq-connector .
#   docker build --target postgres-connector -t faas-connectors/postgres-connector .
#   docker build --target mqtt-connector  -t faas-connectors/mqtt-connector .
#   docker build --target gateway         -t faas-connectors/gateway .   # also the default
#
# One build stage compiles all eight binaries (BuildKit builds it once for every target, so
# `docker compose build` compiles the workspace a single time); each runtime stage copies
# one of them into a distroless image.
#
# Runtime base: gcr.io/distroless/cc-debian12, as the `nonroot` user (uid 65532).
# - The binaries link glibc dynamically and need libgcc_s for unwinding, which `cc` has and
#   `static` lacks; everything else is linked in: librdkafka is built from source by
#   rdkafka-sys and zlib statically (LIBZ_SYS_STATIC); HTTP TLS is rustls; librdkafka
#   uses the base image's libssl3 for broker TLS and SCRAM.
# - It carries CA certificates (gateway and broker TLS, AWS) and /etc/passwd for the
#   non-root user, and no shell, package manager or coreutils: nothing to exec into but
#   the binary. Kubernetes probes are HTTP (`/healthz`, `/readyz`), so none is needed.
# - Builder and runtime are both Debian 12 (bookworm), so the glibc the binaries were
#   linked against is the one they run with.
# For a debugging shell, swap the runtime base for debian:bookworm-slim (same glibc) and
# add `USER 65532`; nothing else changes.

# Edition 2024 with let-chains needs Rust 1.88, redb (the async queue's store) 1.89 or
# later; 1.95 is what CI tests with.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# librdkafka (rdkafka-sys) is configured and compiled from source: a C/C++ toolchain,
# make, cmake and perl; pkg-config for the -sys crates' probes; libssl-dev because
# librdkafka is built with OpenSSL (TLS, SASL_SSL, SCRAM). The runtime base carries libssl3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake perl pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Static zlib, so the runtime image needs no libz.so. Symbols are kept (panic backtraces
# name functions), debug info is dropped.
ENV LIBZ_SYS_STATIC=1 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TARGET_DIR=/src/target
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin cron-connector \
        --bin kafka-connector \
        --bin redis-connector \
        --bin sqs-connector \
        --bin nats-connector \
        --bin rabbitmq-connector \
        --bin postgres-connector \
        --bin mqtt-connector \
        --bin gateway \
 && mkdir -p /out/gateway-state \
 && cp target/release/cron-connector target/release/kafka-connector \
       target/release/redis-connector target/release/sqs-connector \
       target/release/nats-connector target/release/rabbitmq-connector \
       target/release/postgres-connector \
       target/release/mqtt-connector \
       target/release/gateway /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532

FROM runtime AS cron-connector
COPY --from=build /out/cron-connector /usr/local/bin/cron-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/cron-connector"]

FROM runtime AS kafka-connector
COPY --from=build /out/kafka-connector /usr/local/bin/kafka-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/kafka-connector"]

FROM runtime AS redis-connector
COPY --from=build /out/redis-connector /usr/local/bin/redis-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/redis-connector"]

FROM runtime AS sqs-connector
COPY --from=build /out/sqs-connector /usr/local/bin/sqs-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/sqs-connector"]

FROM runtime AS nats-connector
COPY --from=build /out/nats-connector /usr/local/bin/nats-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/nats-connector"]

FROM runtime AS rabbitmq-connector
COPY --from=build /out/rabbitmq-connector /usr/local/bin/rabbitmq-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/rabbitmq-connector"]

FROM runtime AS postgres-connector
COPY --from=build /out/postgres-connector /usr/local/bin/postgres-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/postgres-connector"]
FROM runtime AS mqtt-connector
COPY --from=build /out/mqtt-connector /usr/local/bin/mqtt-connector
# /metrics, /healthz and /readyz (connector.metrics_addr).
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/mqtt-connector"]

# The gateway: API on 8080, /metrics /healthz /readyz on 8082. Its defaults bind to
# loopback, which a container cannot be reached on, so the image binds every interface;
# publish the port to the host's loopback only, or turn basic_auth on, since the local
# provider runs the commands the deploy API names. Deployed functions are kept in
# /var/lib/faas-gateway, a directory owned by the non-root user (mount a volume there).
FROM runtime AS gateway
COPY --from=build --chown=65532:65532 /out/gateway-state /var/lib/faas-gateway
COPY --from=build /out/gateway /usr/local/bin/gateway
ENV gateway_bind=0.0.0.0:8080 \
    metrics_bind=0.0.0.0:8082 \
    state_dir=/var/lib/faas-gateway
EXPOSE 8080 8082
VOLUME ["/var/lib/faas-gateway"]
ENTRYPOINT ["/usr/local/bin/gateway"]
