# Multi-stage build of the three fairgate services and the crowd. One image; the compose file
# picks the binary per service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p fairgate-buffer -p fairgate-queue -p fairgate-purchase -p fairgate-loadtest -p fairgate-shared \
 && mkdir /out \
 && cp target/release/buffer target/release/queue target/release/purchase \
       target/release/crowd target/release/fairgate-migrate /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 fairgate
COPY --from=build /out/ /usr/local/bin/
USER fairgate
ENV LOG_FORMAT=json
