"""The script's side of the host model store (paper 4.4.1, Figure 6). The host keeps named models
as parameter blobs plus metadata with M / M0 / Mbuf version control; everything model-specific is
here: the metadata records the architecture ("arch") and its full config ("config"), so a script
rebuilds the net from what is stored, and a script whose architecture changed (a hot-deployed new
release) migrates the stored parameters: same name and shape are kept, the rest start fresh.

Parameters cross the host-child channel at most once each way per run: `begin_update` brings them
in, `commit` (or `create` for a new model) sends them out; a commit of the same architecture sends
only what changed (of the embedding tables, the rows the update touched)."""
from walle import HostAPIError, model, tunnel

from coda import nets


def info_or_none(name):
    try:
        return model.info(name=name)
    except HostAPIError as e:
        if e.kind != "NotFound":
            raise
    return None


def ensure_from_resource(name, resource):
    """The model's info; a missing model is created by the host from a down-tunnel resource (the
    cloud's global model: its parameters and, in its metadata, its arch and config)."""
    info = info_or_none(name)
    if info is None:
        info = model.create(name=name, resource=resource, exist_ok=True)
    return info


def base_resource(info):
    """{"name", "digest"} of the resource M0 was created from ({} for a model made by a script)."""
    got = info["m0_meta"].get("resource") if isinstance(info.get("m0_meta"), dict) else None
    return got if isinstance(got, dict) else {}


def follow_resource(name, resource):
    """(info, restarted): the model, restarted from the resource when a newer version of it was
    published than the one its M0 came from (paper 5.2: each day's personal model starts from that
    day's cloud model). Restarting makes the resource both M0 and M, as a new version; M's own
    updates since are dropped, M0 is the backup again. Only the resource's info crosses the tunnel
    unless it changed."""
    info = info_or_none(name)
    if info is None:
        return model.create(name=name, resource=resource, exist_ok=True), True
    if info["M0"].get("source") != "resource:" + resource:
        return info, False  # a model the script made itself: not the cloud's to replace
    latest = tunnel.down(resource, format="info")
    if base_resource(info).get("digest") == latest["digest"]:
        return info, False
    return model.create(name=name, resource=resource, replace=True), True


def base_config(info):
    """The config of M0, the model as it was created (the global model it started from): the
    architecture a release asks for is this plus the release's own overrides, so a rolled-back
    release trains its own architecture again."""
    meta = info["m0_meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"model {info['name']!r} has no config in its metadata: not a CoDA model")
    return meta["config"]


class Update:
    """One update of a stored model: `net` holds M's parameters (migrated if the shapes changed)."""

    def __init__(self, name, net, arch):
        self.name, self.net, self.arch = name, net, arch
        got = model.begin_update(name=name)
        self.base_version, self.base = got["version"], got["params"]
        self.fresh = net.adopt(got["params"])  # names that did not fit: a changed architecture
        self.done = False

    @property
    def migrated(self):
        return bool(self.fresh)

    def commit(self, extra_meta=None):
        meta = {"arch": self.arch, "config": self.net.config}
        meta.update(extra_meta or {})
        params = self.net.params()
        delta = None if self.fresh else nets.delta(params, self.base)
        if delta is None:
            res = model.commit(name=self.name, params=params, meta=meta, base_version=self.base_version)
        else:
            try:
                res = model.commit(name=self.name, params=delta[0], rows=delta[1], meta=meta,
                                   base_version=self.base_version)
            except HostAPIError as e:  # a host from before delta commits: send the whole model
                if e.kind != "InvalidArgument" or "bad arguments for model.commit" not in str(e):
                    raise
                res = model.commit(name=self.name, params=params, meta=meta, base_version=self.base_version)
        self.done = True
        return res["version"]

    def discard(self):
        model.discard(name=self.name)
        self.done = True
        return self.base_version


def create(name, net, arch, extra_meta=None):
    meta = {"arch": arch, "config": net.config}
    meta.update(extra_meta or {})
    return model.create(name=name, params=net.params(), meta=meta)["version"]


def load_for_inference(name, build, resource=None):
    """(net, served_from, version): M, or M0 while M is being replaced. `build(config)` makes the net.
    A model this device does not have yet is first created from `resource` (the global model), so a
    brand-new device ranks with the cloud's model until its own training commits."""
    if resource is not None:
        ensure_from_resource(name, resource)
    got = model.load(name=name)
    net = build(got["meta"]["config"])
    net.set_params(got["params"])
    return net, got["served_from"], got["version"]
