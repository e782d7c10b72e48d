"""A NetworkPolicy evaluator with Kubernetes semantics (networking.k8s.io/v1), for pod-to-pod paths.

- A pod is isolated for a direction (Ingress / Egress) when any policy of its namespace selects it
  (spec.podSelector) and lists that direction in policyTypes. Without policyTypes a policy is of type Ingress,
  plus Egress when it has an `egress` section.
- An isolated pod allows a connection when any rule of any selecting policy of that direction matches it:
  the peer (`from` / `to`; absent or empty = every peer) and the port (`ports`; absent or empty = every port).
- A peer with namespaceSelector and podSelector matches pods selected by both; podSelector alone means the
  policy's own namespace; namespaceSelector alone means every pod of the selected namespaces. ipBlock peers
  describe addresses, not pods, and never match a pod here.
- A label selector: matchLabels AND every matchExpression (In, NotIn, Exists, DoesNotExist); {} selects all.
- Namespaces carry kubernetes.io/metadata.name = their name (set by the API server), plus any given labels.
- A connection needs both: egress from the source and ingress to the destination.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports, for policies that name them


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {operator!r}")
    return True


def policy_types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


class Cluster:
    """The NetworkPolicies in force and the namespaces' labels."""

    def __init__(self, objects: Iterable[Mapping[str, Any]], namespace_labels: Mapping[str, Mapping[str, str]] | None = None):
        self.policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
        for policy in self.policies:
            if not policy["metadata"].get("namespace"):
                raise ValueError(f"NetworkPolicy {policy['metadata']['name']} has no namespace")
        self.namespace_labels = namespace_labels or {}

    def labels_of(self, namespace: str) -> dict[str, str]:
        return {**self.namespace_labels.get(namespace, {}), NAME_LABEL: namespace}

    def _peer_matches(self, peer: Mapping[str, Any], policy_namespace: str, pod: Pod) -> bool:
        if "ipBlock" in peer:
            return False
        if "namespaceSelector" not in peer and "podSelector" not in peer:
            raise ValueError(f"a peer with neither selector: {peer}")
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], self.labels_of(pod.namespace))
        else:
            in_namespace = pod.namespace == policy_namespace
        return in_namespace and selects(peer.get("podSelector") or {}, pod.labels)

    @staticmethod
    def _port_matches(ports: list[Mapping[str, Any]] | None, pod: Pod, port: int, protocol: str) -> bool:
        if not ports:
            return True
        for entry in ports:
            if entry.get("protocol", "TCP") != protocol:
                continue
            wanted = entry.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):  # a named port of the destination's containers
                if pod.ports.get(wanted) == port:
                    return True
            elif wanted <= port <= entry.get("endPort", wanted):
                return True
        return False

    def allows(self, direction: str, pod: Pod, peer: Pod, port: int, protocol: str) -> bool:
        """Whether `pod`'s policies let it talk to `peer` (Egress) or `peer` talk to it (Ingress)."""
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        selecting = [p for p in self.policies if p["metadata"]["namespace"] == pod.namespace
                     and selects(p["spec"]["podSelector"], pod.labels) and direction in policy_types(p)]
        if not selecting:
            return True  # not isolated
        port_owner = pod if direction == "Ingress" else peer  # the port is always the destination's
        return any((not rule.get(peers_key) or any(self._peer_matches(x, p["metadata"]["namespace"], peer)
                                                    for x in rule[peers_key]))
                   and self._port_matches(rule.get("ports"), port_owner, port, protocol)
                   for p in selecting for rule in p["spec"].get(rules_key) or [])

    def connects(self, source: Pod, destination: Pod, port: int, protocol: str = "TCP") -> bool:
        return (self.allows("Egress", source, destination, port, protocol)
                and self.allows("Ingress", destination, source, port, protocol))
