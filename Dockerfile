# Hopper's binaries, plus python3 for the exec example.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p hopper-dispatcher -p hopper-consumer

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/hopper-dispatcher /src/target/release/hopper-consumer /usr/local/bin/
WORKDIR /app
COPY config ./config
