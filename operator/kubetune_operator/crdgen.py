"""Generate the FineTuneJob CRD from the pydantic models in `api` (the one source of truth), and
with it the chart's values.yaml, values.schema.json and Chart.yaml versions (`valuesgen`) and its
Grafana dashboards (`dashboards`).

    python -m kubetune_operator.crdgen            # rewrite the generated files
    python -m kubetune_operator.crdgen --check    # exit 1 when a generated file is stale

Pydantic emits JSON Schema (draft 2020-12, with $refs, anyOf-null for optionals); Kubernetes
wants a structural OpenAPI v3.0 schema (everything inline, no nulls, `x-kubernetes-*`
extensions). `structural()` does that translation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import api, dashboards, valuesgen

REPO = Path(__file__).resolve().parents[2]
CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
MANIFEST_PATH = REPO / "manifests" / "crds" / f"{CRD_NAME}.yaml"
CHART_TEMPLATE_PATH = REPO / "charts" / "kubetune" / "templates" / "crds.yaml"

_COPY = ("description", "pattern", "minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems", "enum")


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node into a Kubernetes structural schema node."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in schema:  # Optional[X] -> X (absence, not null, means "unset" in Kubernetes)
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in CRD schema: {schema}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return structural({**options[0], **rest}, defs)

    out: dict[str, Any] = {}
    kind = schema.get("type")
    if "const" in schema:
        out["enum"] = [schema["const"]]
    for key in _COPY:
        if key in schema and key not in out:
            out[key] = schema[key]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):  # draft 2020 numbers -> OpenAPI 3.0 booleans
        if key in schema:
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = schema[key]
            out[key] = True
    if "default" in schema and schema["default"] is not None:
        out["default"] = schema["default"]
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value

    if kind == "object" or "properties" in schema:
        out["type"] = "object"
        props = schema.get("properties")
        if props:
            out["properties"] = {name: structural(sub, defs) for name, sub in props.items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        extra = schema.get("additionalProperties")
        if extra is True or (props is None and extra in (None, {})):
            out["x-kubernetes-preserve-unknown-fields"] = True  # pass-through Kubernetes objects
        elif isinstance(extra, dict):
            out["additionalProperties"] = structural(extra, defs)
    elif kind == "array":
        out["type"] = "array"
        out["items"] = structural(schema.get("items", {}), defs)
    elif kind in ("string", "integer", "number", "boolean"):
        out["type"] = kind
    else:
        raise ValueError(f"unsupported schema node: {schema}")
    return out


def _object_defaults(model: type[BaseModel], node: dict[str, Any]) -> None:
    """Sub-objects made by default_factory default to their full default value, so CEL rules see
    every field of an omitted object (the API server does not default inside a default)."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = node.get("properties", {}).get(alias)
        if sub is None:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if field.default_factory is not None:
                sub["default"] = field.get_default(call_default_factory=True).to_json_dict()
            _object_defaults(annotation, sub)
        elif field.default_factory is not None and "default" not in sub:
            sub["default"] = field.get_default(call_default_factory=True)


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    node = structural(raw, raw.get("$defs", {}))
    _object_defaults(model, node)
    return node


def crd() -> dict[str, Any]:
    spec = model_schema(api.FineTuneJobSpec)
    status = model_schema(api.FineTuneJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": api.PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A fine-tuning run of an open model (LoRA, QLoRA or full) "
                            "that checkpoints to S3 and survives spot preemptions.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `python -m kubetune_operator.crdgen` from operator/kubetune_operator/api.py. Do not edit.\n"


def render_manifest() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


def render_chart_template() -> str:
    """The chart's copy, behind the cert-manager-style lifecycle switches crds.enabled/crds.keep."""
    body = yaml.safe_dump(crd(), sort_keys=False, width=120)
    body = body.replace(
        f"metadata:\n  name: {CRD_NAME}\n",
        f"metadata:\n  name: {CRD_NAME}\n"
        '  labels:\n    {{- include "kubetune.labels" . | nindent 4 }}\n'
        "  {{- if .Values.crds.keep }}\n  annotations:\n    helm.sh/resource-policy: keep\n  {{- end }}\n",
        1,
    )
    # Helm would try to evaluate "{{" inside descriptions/CEL; ours contain none, checked here.
    assert body.count("{{") == 3, "CRD text must not contain template braces"
    return HEADER + "{{- if .Values.crds.enabled }}\n" + body + "{{- end }}\n"


def outputs() -> dict[Path, str]:
    return {
        MANIFEST_PATH: render_manifest(),
        CHART_TEMPLATE_PATH: render_chart_template(),
        **valuesgen.outputs(),
        **dashboards.outputs(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a generated file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print("stale generated files (run `python -m kubetune_operator.crdgen`):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
