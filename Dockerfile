# syntax=docker/dockerfile:1
# Tidemark: a static binary on distroless, running as a non-root user.
#   docker build -t tidemark --build-arg VERSION=0.9.0 .
#   docker run --rm tidemark version
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=""
RUN CGO_ENABLED=0 GOFLAGS=-trimpath go build \
      -ldflags "-s -w -X github.com/tidemark/tidemark/internal/buildinfo.version=${VERSION}" \
      -o /out/tidemark ./cmd/tidemark

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/tidemark /usr/local/bin/tidemark
USER nonroot:nonroot
# The operator listener (/healthz, /readyz, /leader, /metrics, /admin/).
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/tidemark"]
CMD ["run", "--config", "/etc/tidemark/tidemark.yml"]
