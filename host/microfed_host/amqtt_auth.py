"""amqtt plugins that enforce a provisioned mesh's broker login, like mosquitto does with
the same files (microfed_host.brokerauth): the `$7$` password file (amqtt's own FileAuthPlugin
takes only Argon2/sha512-crypt hashes) and the mosquitto-format ACL. Both files are re-read
when they change, so a revoke takes effect at the next CONNECT without a restart.
Loaded only inside the embedded broker process (microfed_host.broker --serve-amqtt)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin

from microfed_host import brokerauth

_cache: dict[str, tuple[float, Any]] = {}


def _load(path: str, parse: Any) -> Any:
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return parse(None)
    hit = _cache.get(path)
    if hit is None or hit[0] != mtime:
        hit = (mtime, parse(Path(path)))
        _cache[path] = hit
    return hit[1]


def _passwords(p: Path | None) -> dict[str, str]:
    return {} if p is None else brokerauth.read_password_file(p)


def _acl(p: Path | None) -> dict[str, list[tuple[str, str]]]:
    return {} if p is None else brokerauth.parse_acl(p.read_text())


class MeshPasswordPlugin(BaseAuthPlugin):
    """CONNECT needs a username and password that match broker/passwd; anonymous: refused."""

    @dataclass
    class Config:
        password_file: str = ""

    async def authenticate(self, *, session: Any) -> bool | None:
        users = _load(self.config.password_file, _passwords)
        h = users.get(session.username or "") if session is not None else None
        return h is not None and brokerauth.check_password(session.password or "", h)


class MeshACLPlugin(BaseTopicPlugin):
    """Publish needs a write rule, subscribe and delivery a read rule (mosquitto semantics)."""

    @dataclass
    class Config:
        acl_file: str = ""

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        if session is None or not topic:
            return False
        rules = _load(self.config.acl_file, _acl).get(session.username or "", [])
        need = "write" if action == Action.PUBLISH else "read"
        return any(need in access and TopicAccessControlListPlugin.topic_ac(topic, allowed)
                   for access, allowed in rules)
