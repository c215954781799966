"""RBAC for the emulated API server, built from the rendered manifests themselves.

The emulator used to allow every call but those a test denied, so a call the shipped
Role does not grant passed every test and failed on a real cluster with 403. Now the
``k8s_api`` fixture grants exactly what ``kubectl kustomize k8s/<overlay>`` binds to the
autoscaler's ServiceAccount: its RoleBindings' Roles in the namespace, its
ClusterRoleBindings' ClusterRoles cluster-wide.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Grants:
    """(namespace, apiGroup, resource, verb) allowed by Roles, and (apiGroup, resource,
    verb) allowed everywhere by ClusterRoles."""

    namespaced: frozenset[tuple[str, str, str, str]]
    cluster: frozenset[tuple[str, str, str]]

    def allows(self, group: str, resource: str, verb: str, namespace: str | None) -> bool:
        key = (group, resource, verb)
        return key in self.cluster or (namespace is not None
                                       and (namespace, *key) in self.namespaced)


@functools.cache
def kustomized(overlay: str) -> tuple[dict, ...]:
    """The objects of ``kubectl kustomize k8s/<overlay>`` (kubectl runs once per overlay)."""
    done = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / overlay)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize k8s/{overlay} failed: {done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _rules(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role.get("rules", [])
            for group in rule.get("apiGroups", []) for resource in rule.get("resources", [])
            for verb in rule.get("verbs", [])}


def grants_of(objects: tuple[dict, ...], service_account: str = "fleet-autoscaler") -> Grants:
    """What the manifests bind to ``service_account``."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objects
             if o["kind"] in ("Role", "ClusterRole")}
    namespaced: set[tuple[str, str, str, str]] = set()
    cluster: set[tuple[str, str, str]] = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   for s in binding.get("subjects", [])):
            continue
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], ref["name"]))
        if role is None:
            continue  # a binding to a role the manifests do not hold grants nothing
        rules = _rules(role)
        if binding["kind"] == "ClusterRoleBinding":
            cluster |= rules
        else:  # a Role grants in its RoleBinding's namespace only
            where = binding["metadata"].get("namespace", "default")
            namespaced |= {(where, *rule) for rule in rules}
    return Grants(frozenset(namespaced), frozenset(cluster))
