"""kubetune's developer tooling, importable by `make demo`, bench/ and tests alike: pinned
versions, PKI, processes, the local control plane and node, images, the S3 test server and the
tiny models the tests and the demo train. Never shipped in an image."""
