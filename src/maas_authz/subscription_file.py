"""The subscription objects from a file, for running without a cluster (`make demo`).

The file holds MaaSModelRef, MaaSAuthPolicy and MaaSSubscription documents exactly as they would
be applied with kubectl (`---` between them), so the same objects move to a cluster unchanged.
Unlike the cluster, where a broken object is skipped, a broken file fails as a whole, naming the
file, the object and the field: it is configuration, and a reload keeps the last good catalog.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from maas_authz.subscriptions import GROUP, PLURALS, Kind, SubscriptionCatalog
from maas_common.errors import ConfigError


def parse_subscription_file(text: str, source: str) -> SubscriptionCatalog:
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(source, "(document)", f"is not valid YAML: {exc}") from None
    by_kind: dict[Kind, list[Mapping[str, Any]]] = {kind: [] for kind in PLURALS}
    for index, doc in enumerate(documents):
        kind = doc.get("kind") if isinstance(doc, Mapping) else None
        if not isinstance(kind, str) or kind not in by_kind:  # a list or a map is no kind
            raise ConfigError(
                source,
                f"document {index + 1}: kind",
                f"expected one of {', '.join(PLURALS)}, got {kind!r}",
            )
        api_version = doc.get("apiVersion", "")
        if not isinstance(api_version, str) or api_version.partition("/")[0] != GROUP:
            raise ConfigError(
                source, f"document {index + 1}: apiVersion", f"expected {GROUP}/<version>"
            )
        by_kind[kind].append(doc)
    catalog, problems = SubscriptionCatalog.build(
        by_kind["MaaSModelRef"], by_kind["MaaSAuthPolicy"], by_kind["MaaSSubscription"]
    )
    if problems:
        problem = problems[0]
        raise ConfigError(source, f"{problem.key}: {problem.field}", problem.problem)
    return catalog
