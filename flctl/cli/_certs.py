"""``flctl certs``: certificates for mutual TLS, from the first CA to revocation.

Heavy modules (``flctl.security``, ``flctl.store``) are imported inside the commands, so that
``import flctl.cli`` stays fast.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flctl.cli._options import ConfigOpt, JsonOpt, ServerOpt
from flctl.cli._output import Output, command

if TYPE_CHECKING:
    from flctl.core import Config
    from flctl.security import CertificateEntry, IssueReport, Role
    from flctl.store import RevocationRecord
    from flctl.transport.grpc import AdminClient

__all__ = ["certs_app"]

certs_app = typer.Typer(help="Certificates for mutual TLS.", no_args_is_help=True)

#: Certificates that expire within this many days are warned about.
EXPIRY_WARNING_DAYS = 14
_MAX_CSR_BYTES = 64 * 1024
_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")

DaysOpt = Annotated[int, typer.Option(help="Validity of the certificate, in days.")]
ReplaceOpt = Annotated[
    bool,
    typer.Option(help="Issue even if the identity has an active certificate (it stays valid)."),
]
ClientIdOpt = Annotated[
    str | None, typer.Option("--client-id", metavar="ID", help="A client identity.")
]
AdminOpt = Annotated[
    str | None, typer.Option("--admin", metavar="NAME", help="An operator (admin) identity.")
]


@certs_app.command("gen")
@command()
def certs_gen(
    clients: Annotated[
        int | None, typer.Option(help="Issue client certificates c1..cN (default 3).")
    ] = None,
    client_id: Annotated[
        list[str] | None,
        typer.Option("--client-id", metavar="ID", help="A client identity (repeatable)."),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option(
            "--san", metavar="HOST", help="Extra DNS name or IP for the server certificate."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of issued certificates.")] = 365,
    force: Annotated[bool, typer.Option(help="Regenerate everything, CA included.")] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write the project's CA and certificates.

    The CA, server, admin and client certificates, into the project's certs folder.
    """
    from flctl.cli._common import load_project
    from flctl.core.errors import ConfigError
    from flctl.security import generate_project_certs, record_generated

    config = load_project(config_path)
    ids = list(client_id or [])
    if clients is not None and clients < 0:
        raise ConfigError(f"--clients must not be negative, not {clients}")
    if not ids or clients is not None:
        ids += [f"c{i}" for i in range(1, (3 if clients is None else clients) + 1)]
    ids = list(dict.fromkeys(ids))
    try:
        report = generate_project_certs(
            config.certs_path, ids, sans=san or [], days=days, force=force
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    record_generated(config.certs_path, report)
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "certs_dir": str(report.certs_dir),
                "written": report.written,
                "reused": report.reused,
                "clients": ids,
            }
        )
        return
    out.line(f"certificates in {report.certs_dir}")
    if report.written:
        out.line(f"  written: {', '.join(report.written)}")
    if report.reused:
        out.line(f"  kept:    {', '.join(report.reused)}")


@certs_app.command("issue")
@command()
def certs_issue(
    client_id: ClientIdOpt = None,
    admin: AdminOpt = None,
    days: DaysOpt = 365,
    replace: ReplaceOpt = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Issue a certificate for a new client or operator.

    A key and a certificate for a client (--client-id) or an operator (--admin).
    """
    from flctl.cli._common import load_project
    from flctl.core.errors import ConfigError
    from flctl.security import issue_project_certificate

    name, role = _name_and_role(client_id, admin)
    config = load_project(config_path)
    try:
        report = issue_project_certificate(
            config.certs_path,
            name,
            role,
            days=days,
            replace=replace,
            revoked=_revocations(config),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _print_issued(Output(json_mode=json_output), config.certs_path, report)


@certs_app.command("request")
@command()
def certs_request(
    client_id: ClientIdOpt = None,
    admin: AdminOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for ID.key and ID.csr (default: the project's certs)."),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Overwrite an existing ID.key.")] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write a new key and a signing request.

    Run it on the key holder's machine: the key (0600) never leaves it, and no CA is needed.
    """
    from flctl.core.errors import ConfigError
    from flctl.security import write_request

    name, role = _name_and_role(client_id, admin)
    folder = out_dir if out_dir is not None else _default_certs_dir(config_path)
    try:
        key_path, csr_path = write_request(folder, name, role, replace=replace)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sign = f"flctl certs sign {csr_path.name} --role {role.value}"
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "identity": name,
                "role": role.value,
                "key": str(key_path),
                "csr": str(csr_path),
                "next": sign,
            }
        )
        return
    out.line(f"key:     {key_path} (keep it here; it never leaves this machine)")
    out.line(f"request: {csr_path}")
    out.line(f"next: send {csr_path.name} to the operator, who runs `{sign}`,")
    out.line(f"      and put the {name}.crt and ca.crt they send back next to {key_path.name}")


@certs_app.command("sign")
@command()
def certs_sign(
    csr_file: Annotated[
        Path, typer.Argument(metavar="FILE.csr", help="The signing request (ID.csr).")
    ],
    role: Annotated[
        str, typer.Option(metavar="[client|admin]", help="The role to grant: client or admin.")
    ],
    days: DaysOpt = 365,
    replace: ReplaceOpt = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Sign a request with the project's CA.

    Writes ID.crt, the ID taken from the request.
    """
    from flctl.cli._common import load_project
    from flctl.core.errors import CertificateError, ConfigError
    from flctl.security import Role, sign_project_request

    if role not in ("client", "admin"):
        raise ConfigError(f"--role must be client or admin, not {role!r}")
    config = load_project(config_path)
    try:
        with csr_file.open("rb") as f:
            csr_pem = f.read(_MAX_CSR_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {csr_file}: {exc.strerror or exc}") from None
    if len(csr_pem) > _MAX_CSR_BYTES:
        raise CertificateError(f"{csr_file} is larger than {_MAX_CSR_BYTES} bytes; not a CSR")
    try:
        report = sign_project_request(
            config.certs_path,
            csr_pem,
            Role(role),
            days=days,
            replace=replace,
            revoked=_revocations(config),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _print_issued(Output(json_mode=json_output), config.certs_path, report)


@certs_app.command("revoke")
@command()
def certs_revoke(
    identity: Annotated[str, typer.Argument(help="The client or admin identity to revoke.")],
    serial: Annotated[
        str | None,
        typer.Option(
            metavar="HEX", help="Revoke only this certificate (hex serial, as `certs ls` shows it)."
        ),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Revoke an identity, or one of its certificates.

    Every certificate of the identity, or only the one --serial names.

    While a coordinator runs, the revocation goes through its Admin service (recorded with the
    admin's identity, and enforced at once); otherwise it is written to the state store.
    """
    from flctl.cli._common import load_project, lock_or_running
    from flctl.core.errors import ConfigError, NotFoundError
    from flctl.security import list_project_certificates
    from flctl.store import LOCAL_AUTHOR, is_revoked, open_store, revoke

    config = load_project(config_path)
    serial_number = None if serial is None else _parse_serial(serial)
    entries = [
        e for e in list_project_certificates(config.certs_path).entries if e.name == identity
    ]
    if not entries:
        raise NotFoundError(
            f"no certificate of {identity!r} is known in {config.certs_path}",
            hint="`flctl certs ls` lists the identities",
        )
    if any(e.role.value not in ("client", "admin") for e in entries):
        raise ConfigError(
            f"{identity!r} is the {entries[0].role.value}'s certificate; only client and admin "
            "certificates are revoked",
            hint="replace a compromised CA or server certificate with `flctl certs gen --force`",
        )
    if serial_number is not None and serial_number not in {e.serial for e in entries}:
        raise NotFoundError(
            f"{identity!r} has no certificate with serial {serial_number:x}",
            hint=f"`flctl certs ls` lists the serials of {identity}",
        )
    with contextlib.ExitStack() as stack:
        # --server: a coordinator elsewhere (or the leader of several); else this project's
        running = (
            {"address": server}
            if server
            else stack.enter_context(lock_or_running(config.state_path, "certs revoke"))
        )
        if running is None:
            with open_store(config, offline="flctl certs revoke") as store:
                was_revoked = is_revoked(store, identity, serial_number)
                record = revoke(
                    store, identity, serial=serial_number, reason=reason, author=LOCAL_AUTHOR
                )
            done = _Revoked(
                record.serial, record.reason, record.author, record.revoked_at, record.event_seq
            )
        else:
            done = _revoke_online(config, identity, serial_number, reason, server)
            was_revoked = done.already
    out = Output(json_mode=json_output)
    what = "every certificate" if done.serial is None else f"serial {done.serial:x}"
    where = "" if running is None else f" through the coordinator at {running.get('address')}"
    if json_output:
        out.json(
            {
                "identity": identity,
                "serial": None if done.serial is None else f"{done.serial:x}",
                "reason": done.reason,
                "author": done.author,
                "revoked_at": _iso(done.revoked_at),
                "event_seq": done.event_seq,
                "already_revoked": was_revoked,
                "coordinator": None if running is None else running.get("address"),
            }
        )
        return
    note = " (it was revoked already; recorded again)" if was_revoked else ""
    out.line(f"revoked {identity} ({what}){note}")
    out.line(f"  recorded in {config.state_path}{where} by {done.author}, event #{done.event_seq}")
    if running is not None:
        out.line(f"  the coordinator refuses {identity} from now on and ended its session")


@certs_app.command("ls")
@command()
def certs_ls(config_path: ConfigOpt = None, json_output: JsonOpt = False) -> None:
    """List certificates: roles, serials, expiry, revocations."""
    from flctl.cli._common import load_project
    from flctl.security import list_project_certificates

    config = load_project(config_path)
    revocations = _revocation_records(config)
    listing = list_project_certificates(
        config.certs_path, revoked=[(r.identity, r.serial) for r in revocations]
    )
    now = datetime.now(UTC)
    warnings = [*listing.problems, *_expiry_warnings(listing.entries, now)]
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "certs_dir": str(listing.certs_dir),
                "certificates": [_entry_dict(e, now) for e in listing.entries],
                "revocations": [
                    {
                        "identity": r.identity,
                        "serial": None if r.serial is None else f"{r.serial:x}",
                        "reason": r.reason,
                        "author": r.author,
                        "revoked_at": _iso(r.revoked_at),
                    }
                    for r in revocations
                ],
                "warnings": warnings,
            }
        )
        return
    if not listing.entries:
        out.line(f"no certificates in {listing.certs_dir}; run `flctl certs gen`")
    else:
        out.table(
            ["identity", "role", "status", "expires (UTC)", "days", "file", "serial"],
            [
                [
                    e.name,
                    e.role.value,
                    e.status(now),
                    f"{e.not_after:%Y-%m-%d %H:%M}",
                    f"{e.days_left(now):.1f}",
                    e.file if e.is_current else f"({e.file}, replaced)",
                    f"{e.serial:x}",
                ]
                for e in listing.entries
            ],
            title=f"certificates in {listing.certs_dir}",
            right=["days"],
        )
    for warning in warnings:
        out.note(f"warning: {warning}")


# -- helpers ------------------------------------------------------------------------------------


def _name_and_role(client_id: str | None, admin: str | None) -> tuple[str, Role]:
    from flctl.core.errors import ConfigError
    from flctl.security import Role

    if (client_id is None) == (admin is None):
        raise ConfigError("give exactly one of --client-id ID and --admin NAME")
    if client_id is not None:
        return client_id, Role.CLIENT
    assert admin is not None
    return admin, Role.ADMIN


def _default_certs_dir(config_path: Path | None) -> Path:
    """The project's certs folder if there is a project here, else ./certs."""
    from flctl.core import find_project, load_config
    from flctl.core.errors import ProjectNotFoundError

    try:
        return load_config(config_path or find_project()).certs_path
    except ProjectNotFoundError:
        return Path("certs")


def _revocation_records(config: Config) -> list[RevocationRecord]:
    """The project's revocations; none when the state database does not exist yet."""
    from flctl.core.errors import NotFoundError
    from flctl.store import list_revocations, open_store

    try:
        store = open_store(config, read_only=True)
    except NotFoundError:
        return []  # no store yet; one that was lost is refused (StoreLostError)
    with store:
        return list_revocations(store)


def _revocations(config: Config) -> list[tuple[str, int | None]]:
    return [(r.identity, r.serial) for r in _revocation_records(config)]


@dataclass(frozen=True)
class _Revoked:
    """A revocation as recorded, by the store directly or by the running coordinator."""

    serial: int | None
    reason: str
    author: str
    revoked_at: float
    event_seq: int
    already: bool = False


def _revoke_online(
    config: Config, identity: str, serial: int | None, reason: str, server: str | None = None
) -> _Revoked:
    """Revoke through the running coordinator's Admin service (audited as the admin)."""
    from flctl.cli._common import call_admin

    async def call(client: AdminClient) -> _Revoked:
        reply = await client.revoke(identity, serial=serial, reason=reason)
        return _Revoked(
            int(reply.serial, 16) if reply.serial else None,
            reply.reason,
            reply.author,
            reply.revoked_at_unix,
            int(reply.event_seq),
            reply.already_revoked,
        )

    return call_admin(config, server, call)


def _parse_serial(text: str) -> int:
    from flctl.core.errors import ConfigError

    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("0x")
    if _SERIAL_RE.fullmatch(cleaned) is None or int(cleaned, 16) == 0:
        raise ConfigError(
            f"--serial must be a certificate serial in hex, as `flctl certs ls` shows it, "
            f"not {text!r}"
        )
    return int(cleaned, 16)


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def _entry_dict(entry: CertificateEntry, now: datetime) -> dict[str, Any]:
    return {
        "identity": entry.name,
        "role": entry.role.value,
        "serial": f"{entry.serial:x}",
        "fingerprint": entry.fingerprint,
        "issuer": entry.issuer,
        "not_before": entry.not_before.isoformat(),
        "not_after": entry.not_after.isoformat(),
        "days_left": round(entry.days_left(now), 2),
        "status": entry.status(now),
        "revoked": entry.is_revoked,
        "current": entry.is_current,
        "file": entry.file,
    }


def _expiry_warnings(entries: list[CertificateEntry], now: datetime) -> list[str]:
    warnings = []
    for entry in entries:
        if not entry.is_current:
            continue
        status, days = entry.status(now), entry.days_left(now)
        when = f"{entry.not_after:%Y-%m-%d %H:%M} UTC"
        if status == "active" and days < EXPIRY_WARNING_DAYS:
            warnings.append(
                f"{entry.name}'s certificate ({entry.file}) expires in {days:.1f} days, on {when}"
            )
        elif status == "expired":
            warnings.append(f"{entry.name}'s certificate ({entry.file}) expired on {when}")
    return warnings


def _print_issued(out: Output, certs_dir: Path, report: IssueReport) -> None:
    record = report.record
    replaced = [
        {"serial": f"{e.serial:x}", "not_after": e.not_after.isoformat()} for e in report.replaced
    ]
    if out.json_mode:
        out.json(
            {
                "identity": record.identity,
                "role": record.role.value,
                "serial": f"{record.serial:x}",
                "fingerprint": record.fingerprint,
                "not_after": record.not_after.isoformat(),
                "certs_dir": str(certs_dir),
                "written": report.written,
                "removed": report.removed,
                "replaced": replaced,
            }
        )
        return
    out.line(
        f"issued {record.identity} ({record.role.value}), serial {record.serial:x}, "
        f"valid until {record.not_after:%Y-%m-%d %H:%M} UTC"
    )
    out.line(f"  written in {certs_dir}: {', '.join(report.written)}")
    if not any(name.endswith(".key") for name in report.written):
        out.line(
            f"  next: send {report.written[-1]} and ca.crt to {record.identity}'s machine, "
            "next to its key"
        )
    if report.removed:
        out.line(f"  removed: {', '.join(report.removed)} (the replaced certificate's key)")
    for entry in replaced:
        out.note(
            f"note: the replaced certificate (serial {entry['serial']}) stays valid until "
            f"{entry['not_after']} unless revoked: "
            f"flctl certs revoke {record.identity} --serial {entry['serial']}"
        )
