# One image, two binaries: whatsapp-operator (the controller) and whatsapp-worker (gateway and
# core roles). The operator starts workers from this same image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p operator -p worker \
 && mkdir -p /out \
 && cp target/release/whatsapp-operator target/release/whatsapp-worker /out/

# Distroless: no shell, no package manager; runs as uid 65532. TLS is rustls, so no OpenSSL.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/whatsapp-operator /out/whatsapp-worker /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/whatsapp-operator"]
CMD ["run"]
