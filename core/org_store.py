"""The organization in etcd (docs/deployment.md, "The organization in etcd").

``--config etcd://host:2379[,host2:2379]/contoso`` names an organization kept in etcd under
the prefix ``/contoso/``. Each object is its own key, so two administrators changing two
objects never touch the same key, and a whole organization is switched at once:

    /contoso/current                              -> "00000003" (the generation in force)
    /contoso/00000003/transport_config            -> the table, as TOML
    /contoso/00000003/send_connector/To Internet  -> the table, as TOML
    /contoso/00000003/.order                      -> {"send_connector": ["To Internet", ...]}
    /contoso/hubs/HUB01                           -> what HUB01 runs: generation, revision

``push-organization`` validates a file, writes it as a new generation in batches (etcd
takes at most 128 operations a transaction), then moves ``current`` in one transaction
that also checks nobody moved it meanwhile: hubs see the old organization or the new one,
never a mix. Generations no hub runs any longer are removed afterwards. The text a hub loads
is the generation written back as TOML (core/toml_text.py) and validated exactly as a file.

A daemon keeps the last good organization in a cache file (atomically written, with its
generation and revision) and starts from it when etcd cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from hubport.core.etcd import Compare, Endpoint, EtcdClient, EtcdError, KeyValue, Op
from hubport.core.toml_text import dumps, table_body

__all__ = ["OrganizationStore", "StoreError", "StoreUrl", "is_store_url"]

SCHEMES = ("etcd", "etcds")
#: sections whose table is one object (the others are arrays of tables, one key each)
SINGLE_TABLES = ("hubport", "transport_config")
#: the order sections are written in (then the others, sorted)
SECTION_ORDER = ("hubport", "transport_config", "site", "site_link", "accepted_domain",
                 "transport_server", "routing_group", "mailbox", "mail_contact",
                 "distribution_group")
BATCH = 100  # puts per transaction (etcd's default limit is 128)
#: seconds a hub's report lives unless renewed (hubs renew it every REPORT_TTL / 3)
REPORT_TTL = 60
ORDER_KEY = ".order"
T = TypeVar("T")


class StoreError(Exception):
    """The organization cannot be read from or written to its store; ``str()`` says which
    endpoint, key or field and why."""


class StoreUrl(str):
    """``--config`` naming an organization store rather than a file."""


def is_store_url(text: str | os.PathLike[str] | None) -> bool:
    return isinstance(text, str) and text.split("://", 1)[0].lower() in SCHEMES \
        and "://" in text


@dataclass
class OrganizationStore:
    """One organization in etcd: where, and how to reach it."""

    url: str  # as shown in messages (no password)
    client: EtcdClient
    prefix: bytes  # "/contoso/"

    @classmethod
    def from_url(cls, url: str) -> OrganizationStore:
        """``etcd[s]://host:port[,host:port...]/prefix[?ca=&cert=&key=&user=&password-file=]``"""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise StoreError(f"{url}: not an etcd:// or etcds:// URL")
        endpoints = []
        for item in (parts.netloc.rsplit("@", 1)[-1]).split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise StoreError(f"{url}: endpoint {item!r} is not host:port")
            endpoints.append(Endpoint(host.strip("[]"), int(port)))
        prefix = unquote(parts.path).strip("/")
        if not prefix:
            raise StoreError(f"{url}: no prefix (write etcd://host:2379/<organization>)")
        options = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"ca", "cert", "key", "user", "password-file"}
        if unknown:
            raise StoreError(f"{url}: unknown option {', '.join(sorted(unknown))} (known: ca,"
                             " cert, key, user, password-file)")
        tls = _tls(url, scheme, options)
        user = options.get("user")
        password = None
        if user is not None:
            password = _password(url, options.get("password-file"))
        shown = f"{scheme}://{','.join(str(e) for e in endpoints)}/{prefix}"
        return cls(shown, EtcdClient(endpoints, tls, user, password), f"/{prefix}/".encode())

    # -- keys ----------------------------------------------------------------------------

    def key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    def key_name(self, key: bytes) -> str:
        return key.decode("utf-8", "replace")

    # -- reading -------------------------------------------------------------------------

    async def current(self) -> tuple[str | None, int]:
        """(the generation in force or None, the store's revision)."""
        found, revision = await self._etcd(self.client.range(self.key("current")))
        return (found[0].value.decode().strip() if found else None), revision

    async def read(self) -> tuple[str, str, int]:
        """(TOML text, generation, revision) of the organization in force."""
        generation, _ = await self.current()
        if not generation:
            raise StoreError(f"{self.url}: no organization here (no key"
                             f" {self.key_name(self.key('current'))}; write one with"
                             " hubport push-organization)")
        items, revision = await self._etcd(self.client.range(self.key(generation, ""),
                                                             prefix=True))
        if not items:
            raise StoreError(f"{self.url}: generation {generation} is empty (key"
                             f" {self.key_name(self.key('current'))} names it)")
        return self._assemble(generation, items), generation, revision

    def _assemble(self, generation: str, items: list[KeyValue]) -> str:
        return dumps(self._data(generation, items), SECTION_ORDER)

    def _data(self, generation: str, items: list[KeyValue]) -> dict[str, Any]:
        """The organization as tomllib would read it, from a generation's keys."""
        base = self.key(generation, "")
        order: dict[str, list[str]] = {}
        tables: dict[str, Any] = {}
        arrays: dict[str, dict[str, dict[str, Any]]] = {}
        for item in items:
            relative = item.key[len(base):].decode("utf-8", "replace")
            if relative == ORDER_KEY:
                try:
                    order = json.loads(item.value)
                except ValueError:
                    raise StoreError(f"{self.key_name(item.key)}: not JSON") from None
                continue
            table = self._table(item)
            section, _, name = relative.partition("/")
            if not name:
                tables[section] = table
            else:
                arrays.setdefault(section, {})[name] = table
        data: dict[str, Any] = dict(tables)
        for section, objects in arrays.items():
            listed = [n for n in order.get(section, []) if n in objects]
            rest = sorted(n for n in objects if n not in listed)
            data[section] = [objects[n] for n in (*listed, *rest)]
        return data

    def _table(self, item: KeyValue) -> dict[str, Any]:
        try:
            return tomllib.loads(item.value.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise StoreError(f"{self.key_name(item.key)}: not a TOML table ({exc})") from None

    # -- writing -------------------------------------------------------------------------

    async def push(self, text: str) -> str:
        """Write a (validated) organization as a new generation and put it in force."""
        data = tomllib.loads(text)
        old, _ = await self.current()
        generation = f"{(int(old) if old and old.isdigit() else 0) + 1:08d}"
        puts: list[Op] = []
        order: dict[str, list[str]] = {}
        for section, value in data.items():
            if isinstance(value, Mapping):
                puts.append(Op(self.key(generation, section), table_body(value).encode()))
            elif isinstance(value, list):
                names = [str(t.get("Name", "")) for t in value if isinstance(t, Mapping)]
                order[section] = names
                for table, name in zip(value, names):
                    puts.append(Op(self.key(generation, section, name),
                                   table_body(table).encode()))
            else:
                raise StoreError(f"{section}: a top-level value is no object")
        puts.append(Op(self.key(generation, ORDER_KEY), json.dumps(order).encode()))
        await self._etcd(self.client.txn([], [Op(self.key(generation, ""), prefix=True)]))
        for start in range(0, len(puts), BATCH):
            await self._etcd(self.client.txn([], puts[start:start + BATCH]))
        found, _ = await self._etcd(self.client.range(self.key("current")))
        compare_revision = found[0].mod_revision if found else 0
        done, _ = await self._etcd(self.client.txn(
            [Compare(self.key("current"), compare_revision)],
            [Op(self.key("current"), generation.encode())]))
        if not done:
            await self._etcd(self.client.txn([], [Op(self.key(generation, ""), prefix=True)]))
            raise StoreError(f"{self.url}: another push changed the organization meanwhile;"
                             " nothing was changed by this one, push again")
        await self.collect(keep=generation)
        return generation

    async def change(self, edits: Mapping[tuple[str, str], Mapping[str, Any] | None],
                     validate: Callable[[str], object], attempts: int = 5) -> str:
        """Set or remove objects of the organization in force, as one transaction.

        ``edits`` maps (section, name) to the object's new table, or None to remove it
        (name "" for ``transport_config`` and ``hubport``). The whole organization with the
        edits is validated (``validate`` raises ConfigErrors), and the transaction only
        applies if nothing in the generation changed since it was read: every object the
        validation read is compared, so two valid changes can never combine into an
        invalid organization. When another change came first, the edits are validated again
        on top of it and retried. Returns the generation changed."""
        for _attempt in range(attempts):
            found, _ = await self._etcd(self.client.range(self.key("current")))
            if not found:
                raise StoreError(f"{self.url}: no organization here to change")
            generation = found[0].value.decode().strip()
            base = self.key(generation, "")
            items, revision = await self._etcd(self.client.range(base, prefix=True))
            data = self._data(generation, items)
            ops: list[Op] = []
            for (section, name), table in edits.items():
                ops.append(_edit(self, data, generation, section, name, table))
            order = {s: [str(t.get("Name", "")) for t in v] for s, v in data.items()
                     if isinstance(v, list)}
            ops.append(Op(self.key(generation, ORDER_KEY), json.dumps(order).encode()))
            validate(dumps(data, SECTION_ORDER))
            done, _ = await self._etcd(self.client.txn(
                [Compare(self.key("current"), found[0].mod_revision),
                 Compare(base, prefix=True, older_than=revision + 1)], ops))
            if done:
                return generation
        raise StoreError(f"{self.url}: the organization kept changing while this change was"
                         " validated; nothing was changed, try again")

    async def share_authority(self, certificate: Path, make: Callable[[], object]) -> str:
        """The organization's CA certificate is the store's (``<prefix>/ca.crt``, outside
        the generations; its key never leaves the machine that made it). With none in the
        store, ``make`` creates this machine's CA and its certificate is published, unless
        another hub published one first. Returns what happened, for the log; StoreError when
        this machine holds another CA than the organization's."""
        key = self.key("ca.crt")
        found, _ = await self._etcd(self.client.range(key))
        local = certificate.read_bytes() if certificate.exists() else None
        if found:
            remote = found[0].value
            if local is None:
                await asyncio.to_thread(_write_public, certificate, remote)
                return "fetched"
            if local != remote:
                raise StoreError(
                    f"{certificate} is another CA than the organization's ({self.key_name(key)}"
                    "): this hub's certificate would not be trusted; move this machine's CA"
                    " folder aside and get a certificate with hubport new-servercertificate"
                    " where the organization's CA key is")
            return "same"
        if local is None:
            await asyncio.to_thread(make)
            local = certificate.read_bytes()
        done, _ = await self._etcd(self.client.txn([Compare(key, 0)], [Op(key, local)]))
        if not done:  # another hub published first: compare with it
            return await self.share_authority(certificate, make)
        return "published"

    async def collect(self, keep: str) -> list[str]:
        """Remove the generations older than ``keep`` (the one in force) that no hub runs any
        longer; the removed ones. A newer one may be a push still being written."""
        items, _ = await self._etcd(self.client.range(self.prefix, prefix=True))
        generations = {item.key[len(self.prefix):].split(b"/", 1)[0].decode()
                       for item in items if b"/" in item.key[len(self.prefix):]}
        generations = {g for g in generations if g.isdigit()}
        running = {keep}
        for item in items:
            if item.key.startswith(self.key("hubs", "")):
                try:
                    running.add(str(json.loads(item.value).get("generation", "")))
                except ValueError:
                    continue
        gone = sorted(g for g in generations - running if keep.isdigit() and int(g) < int(keep))
        for generation in gone:
            await self._etcd(self.client.txn([], [Op(self.key(generation, ""), prefix=True)]))
        return gone

    async def report(self, server: str, generation: str, revision: int) -> None:
        """Record which generation (and store revision) ``server`` runs, for ``REPORT_TTL``
        seconds: a hub that is gone stops holding its generation back from removal."""
        lease = await self._etcd(self.client.grant(REPORT_TTL))
        await self._etcd(self.client.put(self.key("hubs", server), json.dumps(
            {"generation": generation, "revision": revision}).encode(), lease=lease))

    async def hubs(self) -> dict[str, dict[str, Any]]:
        items, _ = await self._etcd(self.client.range(self.key("hubs", ""), prefix=True))
        out: dict[str, dict[str, Any]] = {}
        for item in items:
            try:
                out[item.key[len(self.key("hubs", "")):].decode()] = json.loads(item.value)
            except ValueError:
                continue
        return out

    async def changes(self, revision: int, generation: Callable[[], str]
                      ) -> AsyncIterator[int]:
        """The revision of each change after ``revision`` that matters to a hub running
        ``generation()`` (asked at each change): another generation put in force, or an
        object of this one edited; not the hubs' reports, nor a new generation still being
        written."""
        current = self.key("current")
        async for changed, items in self.client.watch(self.prefix,
                                                      start_revision=revision + 1):
            mine = self.key(generation(), "")
            if any(i.key == current or i.key.startswith(mine) for i in items):
                yield changed

    async def _etcd(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except EtcdError as exc:
            raise StoreError(str(exc)) from None


def _edit(store: OrganizationStore, data: dict[str, Any], generation: str, section: str,
          name: str, table: Mapping[str, Any] | None) -> Op:
    """Apply one edit to ``data`` (the organization being validated); its etcd operation."""
    if section in SINGLE_TABLES or not name:
        if table is None:
            data.pop(section, None)
            return Op(store.key(generation, section))
        data[section] = dict(table)
        return Op(store.key(generation, section), table_body(table).encode())
    objects = data.setdefault(section, [])
    index = next((i for i, t in enumerate(objects)
                  if str(t.get("Name", "")).lower() == name.lower()), None)
    if table is None:
        if index is None:
            raise StoreError(f"{section} {name!r}: no such object to remove")
        stored = str(objects.pop(index).get("Name", name))
        if not objects:
            data.pop(section)
        return Op(store.key(generation, section, stored))
    table = {"Name": name, **{k: v for k, v in table.items() if k != "Name"}}
    if index is None:
        objects.append(table)
    else:
        name = str(objects[index].get("Name", name))
        objects[index] = table
    return Op(store.key(generation, section, name), table_body(table).encode())


# -- loading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """An organization read from its store, with what it was read from."""

    organization: Any  # hubport.core.config.Organization
    text: str
    generation: str
    revision: int


def parse_generation(store: OrganizationStore, text: str, generation: str, revision: int,
                     connector_types: Mapping[str, Any],
                     delivery_agents: Mapping[str, type] | None = None) -> Loaded:
    """Validate a generation's text exactly as a file; errors name the objects' keys.
    Relative paths are taken from the folder the daemon runs in."""
    from hubport.core.config import parse_organization
    from hubport.core.config_fields import ConfigError, ConfigErrors

    source = f"{store.url} generation {generation}"
    try:
        org = parse_organization(text, source=source, base_dir=Path.cwd(),
                                 connector_types=connector_types,
                                 delivery_agents=delivery_agents, version=revision)
    except ConfigErrors as exc:
        raise ConfigErrors([ConfigError(e.file, _keyed(store, generation, e.object), e.field,
                                        e.reason) for e in exc.errors]) from None
    return Loaded(org, text, generation, revision)


def _keyed(store: OrganizationStore, generation: str, obj: str) -> str:
    """``send_connector "X"`` -> ``send_connector "X" (key /org/00000003/send_connector/X)``."""
    section, _, rest = obj.partition(" ")
    name = rest.strip().strip('"') if rest.startswith('"') else ""
    if not section or (not name and section not in SINGLE_TABLES):
        return obj
    key = store.key(generation, section, name) if name else store.key(generation, section)
    return f"{obj} (key {store.key_name(key)})"


async def load(store: OrganizationStore, connector_types: Mapping[str, Any],
               delivery_agents: Mapping[str, type] | None = None) -> Loaded:
    text, generation, revision = await store.read()
    return parse_generation(store, text, generation, revision, connector_types,
                            delivery_agents)


# -- the cache ---------------------------------------------------------------------------


def write_cache(path: Path, text: str, url: str, generation: str, revision: int) -> None:
    """The last good organization, atomically (a temporary file renamed over the old)."""
    from hubport.core.credentials import replace_file

    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# hubport organization cache: {url} generation {generation} revision"
            f" {revision}\n")
    replace_file(path, (head + text).encode(), 0o600)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_cache(path: Path) -> tuple[str, str, int] | None:
    """(text, generation, revision) of a cache file, None if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    head, _, body = text.partition("\n")
    words = head.split()
    try:
        return body, words[-3], int(words[-1])
    except (IndexError, ValueError):
        return None


def _write_public(path: Path, data: bytes) -> None:
    from hubport.core.credentials import replace_file

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, 0o644)


def default_cache(url: str, server: str | None) -> Path:
    """Where a daemon keeps the organization it runs: in ``$STATE_DIRECTORY`` (what
    systemd's StateDirectory= gives a service), else in ``var/`` of the folder it starts
    in (the default StateDirectory of an organization read from a store). It must be
    known before the organization is, to start while the store is away."""
    import hashlib

    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    folder = Path(state) if state else Path.cwd() / "var"
    if server is None:  # the command names no server: the cache this folder holds
        found = sorted(folder.glob(f"organization-*-{digest}.toml"))
        if found:
            return found[0]
    return folder / f"organization-{server or 'first'}-{digest}.toml"


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine from synchronous code, even where an event loop is running (in a
    thread of its own then)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())  # type: ignore[arg-type]
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(("ok", asyncio.run(factory())))  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the caller
            result.append(("error", exc))

    thread = threading.Thread(target=target, name="organization-store")
    thread.start()
    thread.join()
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def _tls(url: str, scheme: str, options: Mapping[str, str]) -> ssl.SSLContext | None:
    if scheme != "etcds" and not {"ca", "cert", "key"} & set(options):
        return None
    try:
        context = ssl.create_default_context(cafile=options.get("ca"))
        if "cert" in options:
            context.load_cert_chain(options["cert"], options.get("key"))
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"{url}: TLS files: {exc}") from None
    return context


def _password(url: str, path: str | None) -> str:
    if path is None:
        env = os.environ.get("HUBPORT_ETCD_PASSWORD")
        if env is None:
            raise StoreError(f"{url}: user= needs password-file= (or HUBPORT_ETCD_PASSWORD)")
        return env
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StoreError(f"{url}: password-file {path}: {exc.strerror or exc}") from None
