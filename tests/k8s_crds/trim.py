"""Makes the small CRD schema fixtures of tests/test_k8s.py from a CRD's published YAML: the openAPIV3Schema of one
version, without descriptions, with the schema of every field that the given manifests leave unused replaced by
{"x-trimmed": true}. The field names stay, so the test still tells a misspelt field (unknown) from a real one
that was trimmed (the test's validator reports the latter as "trimmed from the fixture: regenerate it").

    kubectl kustomize deploy/k8s/overlays/cpu > /tmp/cpu.yaml   # and gpu, kserve: every manifest that uses it
    python tests/k8s_crds/trim.py CRD.yaml --source "project VERSION (commit SHA), PATH" \\
        --out tests/k8s_crds/KIND.json /tmp/cpu.yaml /tmp/gpu.yaml /tmp/kserve.yaml

CEL rules (x-kubernetes-validations) are dropped too: jsonschema cannot evaluate them. The script prints those on
the fields the manifests use, to be checked by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

TRIMMED = {"x-trimmed": True}
DROPPED = ("description", "x-kubernetes-validations")


def trim(schema: dict, values: list, path: str, cel: list[str]) -> dict:
    """schema with only what `values` (every instance's value at this path) reach; CEL rules met go to `cel`."""
    if schema.get("x-kubernetes-validations") and values:
        cel += [f"{path}: {rule['rule']}" for rule in schema["x-kubernetes-validations"]]
    out = {k: v for k, v in schema.items() if k not in DROPPED}
    if "properties" in schema:
        out["properties"] = {}
        for name, sub in schema["properties"].items():
            inner = [v[name] for v in values if isinstance(v, dict) and name in v]
            out["properties"][name] = trim(sub, inner, f"{path}.{name}", cel) if inner else TRIMMED
    if isinstance(schema.get("items"), dict):
        inner = [item for v in values if isinstance(v, list) for item in v]
        out["items"] = trim(schema["items"], inner, f"{path}[]", cel)
    if isinstance(schema.get("additionalProperties"), dict):
        inner = [item for v in values if isinstance(v, dict) for item in v.values()]
        out["additionalProperties"] = trim(schema["additionalProperties"], inner, f"{path}.*", cel)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            out[key] = [trim(branch, values, path, cel) for branch in schema[key]]
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("crd", type=Path)
    parser.add_argument("manifests", type=Path, nargs="+")
    parser.add_argument("--source", required=True, help="where the CRD came from: project, version, commit, path")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    instances = [doc for path in args.manifests for doc in yaml.safe_load_all(path.read_text())
                 if doc and doc.get("kind") == kind and doc["apiVersion"] == f"{group}/{version['name']}"]
    if not instances:
        raise SystemExit(f"no {kind} {group}/{version['name']} in {args.manifests}")
    cel: list[str] = []
    schema = trim(version["schema"]["openAPIV3Schema"], instances, kind, cel)
    fixture = {"source": f"{args.source}; trimmed by tests/k8s_crds/trim.py (descriptions and CEL rules dropped, "
                         f"the schemas of fields that deploy/k8s does not use replaced by x-trimmed)",
               "apiVersion": f"{group}/{version['name']}", "kind": kind, "openAPIV3Schema": schema}
    args.out.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    for rule in cel:
        print("CEL rule on a used field (not checked by the test):", rule, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
