# syntax=docker/dockerfile:1
#
# tally as a static binary on a distroless, non-root base image.
#   docker build --build-arg VERSION="$(git describe --tags --always)" -t tally .
# (`make docker` does exactly that). The image has no shell: the container
# healthcheck is the binary's own `tally healthcheck` subcommand.

# Keep in step with the go line of go.mod: the golang image pins
# GOTOOLCHAIN=local, so an older Go here would refuse to build.
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Modules first: this layer is rebuilt only when go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath \
        -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/tally ./cmd/tally

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.title="tally" \
      org.opencontainers.image.description="Headless billing service in front of Stripe: prepaid credits, one-time purchases, metered usage" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/tally /tally
# The example catalog, so the image starts as is; mount your own over it.
COPY deploy/catalog.example.yaml /etc/tally/catalog.yaml
ENV TALLY_HTTP_ADDR=:8080 \
    TALLY_CATALOG_FILE=/etc/tally/catalog.yaml
EXPOSE 8080
# uid and gid 65532, the distroless nonroot user.
USER nonroot:nonroot
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["/tally", "healthcheck"]
ENTRYPOINT ["/tally"]
CMD ["serve"]
