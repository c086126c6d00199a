"""What the operator commands share: the invocation context (where the platform is, who acts), the
shared options, and output helpers. Errors are handled once, by walle.protos.clikit."""
from __future__ import annotations

import datetime
import os
import pathlib
import re

import click
from rich import box
from rich.console import Console
from rich.table import Table

from walle.protos import device_pb2
from walle.protos.clikit import print_json, want_json

from .. import config as config_mod
from ..errors import InvalidArgument

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
DEFAULT_DATA_DIR = "walle-data"
WIDE_KEY = "walle.wide"
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


def platform_address(text: str) -> str:
    """A --platform value checked as HOST:PORT (port 1..65535): a typo must not dial somewhere else."""
    m = _ADDRESS.match(text.strip())
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise InvalidArgument(f"--platform {text!r} is not HOST:PORT with a port in 1..65535 (e.g. localhost:50051)")
    return text.strip()


def absolute(path: str | os.PathLike) -> str:
    """Paths are resolved once, against the directory the command was started in."""
    return os.path.abspath(os.path.expanduser(path))


class Ctx:
    """Resolved global options (command line, then environment, then the config file)."""

    def __init__(self, platform: str | None = None, data_dir: str | None = None, actor: str | None = None,
                 ca: str | None = None, insecure: bool = False):
        self.cfg = config_mod.load()
        addr = platform or self.cfg.get("platform")
        self.platform_addr = platform_address(addr) if addr else None
        self.data_dir = data_dir or self.cfg.get("data_dir")
        self.actor = actor or self.cfg.get("actor", "operator")
        self.ca = ca or self.cfg.get("ca")
        self.insecure = insecure or str(self.cfg.get("insecure", "")).lower() in ("1", "true", "yes")
        self._api = None

    @property
    def as_json(self) -> bool:
        return want_json()

    @property
    def data_dir(self) -> str:
        """The platform data folder (absolute): --data-dir, WALLE_DATA_DIR or data_dir in the config
        file; without any of them ./walle-data only if it exists (only `walle platform init` makes
        the default one, see `init_data_dir`), so a forgotten option never shows an empty platform."""
        if self.data_dir_given:
            return self.data_dir_given
        if not os.path.isdir(DEFAULT_DATA_DIR):
            raise InvalidArgument(f"no platform data folder: pass --data-dir DIR (or set WALLE_DATA_DIR, or data_dir "
                                  f"in {config_mod.config_path()}), or talk to a server with --platform HOST:PORT; "
                                  f"`walle platform init` creates one (default ./{DEFAULT_DATA_DIR})")
        return absolute(DEFAULT_DATA_DIR)

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self.data_dir_given = absolute(value) if value else None

    @property
    def init_data_dir(self) -> str:
        """The folder `walle platform init` creates: the configured one, else ./walle-data."""
        return absolute(self.data_dir_given or DEFAULT_DATA_DIR)

    def channel(self):
        """A channel to --platform: TLS checked against the platform CA unless --insecure."""
        import grpc
        if self.insecure:
            err_console.print("[bold red]WARNING: --insecure: plaintext gRPC, no server authentication[/bold red]")
            return grpc.insecure_channel(self.platform_addr)
        ca = self.ca or (pathlib.Path(self.data_dir_given or DEFAULT_DATA_DIR) / "pki" / "ca.pem")
        try:
            root = pathlib.Path(ca).read_bytes()
        except OSError:
            raise InvalidArgument(f"no platform CA certificate at {ca}: pass --ca FILE (from `walle platform init`) "
                                  f"or --insecure for a plaintext server") from None
        return grpc.secure_channel(self.platform_addr, grpc.ssl_channel_credentials(root_certificates=root))

    def api(self):
        """The AdminService: remote when --platform is given, else the local data folder."""
        if self._api is None:
            if self.platform_addr:
                from ..client import RemoteAdmin
                token = self.cfg.get("operator_token", "")
                md = (("authorization", f"Bearer {token}"),) if token else ()
                self._api = RemoteAdmin(self.channel(), metadata=md)
            else:
                from ..service import Platform
                self._api = Platform(self.data_dir)
        return self._api

    def platform(self):
        """The local platform on --data-dir (commands that only make sense next to the data)."""
        from ..service import Platform
        return Platform(self.data_dir)


pass_ctx = click.make_pass_decorator(Ctx, ensure=True)


def data_dir_option(f):
    """`--data-dir` on a command overrides the global one (both name the platform data folder)."""
    def cb(ctx, _param, value):
        if value:
            ctx.ensure_object(Ctx).data_dir = value
        return value
    return click.option("--data-dir", "data_dir_", type=click.Path(file_okay=False), expose_value=False,
                        callback=cb, help="Platform data folder (default: the global --data-dir).")(f)


def emit(ctx: Ctx, message, human) -> None:
    """JSON under --json, else the human rendering."""
    if want_json():
        print_json(message)
    else:
        human(message)


def _wide() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(WIDE_KEY))


class CutTable(Table):
    """A table that fits the terminal (80 columns when not a terminal): short columns keep their
    natural width and never wrap; the `long` ones share what is left and are cut with an ellipsis
    (shown whole, folded over lines, with the global --wide)."""

    def __init__(self, *columns: str, long: tuple[str, ...] = (), title: str | None = None):
        super().__init__(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, title_justify="left")
        self.wide, self.cut = _wide(), False
        self._long = [c in long for c in columns]
        self._natural = [len(c) for c in columns]
        self._rows: list[list[str]] = []
        for c, is_long in zip(columns, self._long):
            self.add_column(c, no_wrap=not (is_long and self.wide),
                            overflow="fold" if is_long and self.wide else "ellipsis")

    def add_row(self, *cells, **kwargs) -> None:
        cells = tuple("" if c is None else str(c) for c in cells)
        self._natural = [max(n, len(c)) for n, c in zip(self._natural, cells)]
        self._rows.append(list(cells))
        super().add_row(*cells, **kwargs)

    def show(self) -> None:
        n_long = sum(self._long)
        short = sum(n for n, is_long in zip(self._natural, self._long) if not is_long)
        room = console.width - short - 3 * (len(self.columns) - 1)  # padding and the column divider
        share = max(10, room // n_long) if n_long else 0
        for col, natural, is_long in zip(self.columns, self._natural, self._long):
            if is_long:
                col.max_width = None if self.wide else min(natural, share)
                col.min_width = min(natural, share)
                self.cut = self.cut or natural > share
            else:
                col.min_width = natural
        console.print(self)
        if self.cut and not self.wide:
            err_console.print("[dim](long cells cut with …: add --wide, or --json, to see them whole)[/dim]")


def parse_attrs(text: str) -> device_pb2.DeviceInfo:
    """`user_id=u1,app_version=2.3.0,tags=a|b` -> DeviceInfo."""
    info = device_pb2.DeviceInfo()
    fields = {f.name for f in device_pb2.DeviceInfo.DESCRIPTOR.fields} - {"installed"}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise InvalidArgument(f"--attrs: {part!r} is not KEY=VALUE")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in fields:
            raise InvalidArgument(f"--attrs: unknown attribute {key!r}; known: {', '.join(sorted(fields))}")
        if key == "tags":
            info.tags.extend(t for t in value.split("|") if t)
        else:
            setattr(info, key, value)
    return info


def split_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    if not name:
        raise InvalidArgument(f"{ref!r} is not NAME or NAME@VERSION")
    return name, version


def parse_since(text: str | None) -> int:
    """`--since`: an age (90s, 10m, 2h, 7d), a date (2026-05-01 or 2026-05-01T10:00), or unix seconds."""
    import re
    import time
    if not text:
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return int(time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])
    if text.strip().isdigit():
        return int(text)
    try:
        return int(datetime.datetime.fromisoformat(text.strip()).timestamp())
    except ValueError:
        raise InvalidArgument(f"--since {text!r}: give an age (90s, 10m, 2h, 7d), a date (2026-05-01[T10:00]) "
                              "or unix seconds") from None


def ts(t: int) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"
