module goproxy-sidecar/tests/adversarial/goclient

go 1.22
