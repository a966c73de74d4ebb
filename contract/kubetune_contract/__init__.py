"""The operator↔trainer contract: what the operator writes and the trainer reads, defined once.

Pure on purpose (pydantic only: no torch, no kopf, no kubernetes client, no boto3), so the
operator image and the trainer image both carry it and neither imports the other.

- `config`: the trainer config (`TrainerConfig`), whose training-facing parts are also the
  FineTuneJob spec's own models (the CRD schema is generated from them).
- `progress`: the trainer's exit codes and the progress record the operator copies into status.
- `envvars`: every environment variable name the operator sets or the trainer reads.
- `layout`: the paths, ports and limits both sides must agree on.
- `uris`: the s3:// and pvc:// URI rules and the per-job prefix rule.
- `gpus`: what a GPU type has (memory, dense bf16 peak), by product name or node label.
- `estimate`: the right-sizing estimator (GPU memory per GPU, fit, advice, FLOPs, GPU-hours, USD);
  the operator's preflight, `kubetune estimate` and the trainer's MFU share it.
"""
