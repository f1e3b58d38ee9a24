"""Running as a Hugging Face Space: what the environment a Space sets says (SYSTEM=spaces, SPACE_ID,
SPACE_AUTHOR_NAME, SPACE_HOST, the OAUTH_* of `hf_oauth: true`, SPACES_ZERO_GPU), where the studio keeps its files
there, who may log in, and what the hardware allows. Plain Python: `mactuner studio`, the Space's app.py and the
trainer ask the same questions.

    sp = detect()                 # the Space, or None on any other machine
    setup_storage(sp)             # MACTUNER_HOME and HF_HOME under /data when persistent storage is mounted
    login_policy(sp)              # Login("password" | "oauth" | "open"), or SpaceConfigError saying what to set
    training_refusal()            # why training cannot run on this hardware (ZeroGPU), or None

What the owner sets in the Space's settings (secrets; MACTUNER_ALLOWED_USERS may be a plain variable):

    MACTUNER_PASSWORD       password login instead of Hugging Face login (user MACTUNER_USER, default the owner)
    MACTUNER_ALLOWED_USERS  Hugging Face users or organisations let in besides the owner (comma-separated)
    MACTUNER_OPEN=1         start with no login at all: anyone who opens the Space uses its hardware and files

`MACTUNER_SPACE_DATA` names a folder that stands in for /data (the tests' persistent storage).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

TRUE = ("1", "true", "yes", "on")
DATA = "/data"  # where a Space mounts its persistent storage
OAUTH_VARS = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL")


class SpaceConfigError(Exception):
    """The Space is set up so that the studio must not start (the message says what to set)."""


@dataclass(frozen=True)
class Space:
    id: str  # "owner/name"
    owner: str  # SPACE_AUTHOR_NAME: a user or an organisation
    host: str | None  # SPACE_HOST, e.g. owner-name.hf.space
    data: Path  # /data, or MACTUNER_SPACE_DATA
    persistent: bool  # persistent storage is mounted there (a writable folder)
    zero_gpu: bool  # ZeroGPU hardware: a GPU only inside @spaces.GPU calls
    oauth: bool  # `hf_oauth: true` took effect: Hugging Face login is possible

    @property
    def workspace(self) -> Path | None:
        """Where the workspace lives on persistent storage (None without it: the default, lost at a restart)."""
        return self.data / "mactuner" if self.persistent else None

    @property
    def hf_home(self) -> Path | None:
        return self.data / ".huggingface" if self.persistent else None


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in TRUE


def detect(env: Mapping[str, str] | None = None) -> Space | None:
    """The Space this process runs in (SYSTEM=spaces or SPACE_ID set), or None."""
    env = os.environ if env is None else env
    if env.get("SYSTEM") != "spaces" and not env.get("SPACE_ID"):
        return None
    sid = env.get("SPACE_ID", "").strip()
    owner = env.get("SPACE_AUTHOR_NAME", "").strip() or sid.partition("/")[0]
    data = Path(env.get("MACTUNER_SPACE_DATA") or DATA)
    persistent = data.is_dir() and os.access(data, os.W_OK | os.X_OK)
    host = (env.get("SPACE_HOST") or "").split(",")[0].strip() or None
    oauth = env.get("SYSTEM") == "spaces" and all(env.get(v) for v in OAUTH_VARS)
    return Space(sid, owner, host, data, persistent, _flag(env, "SPACES_ZERO_GPU"), oauth)


def setup_storage(sp: Space | None, env: dict | None = None) -> Path | None:
    """With persistent storage: the workspace at /data/mactuner and the HF cache at /data/.huggingface (unless
    MACTUNER_HOME / HF_HOME are set), so a restarted Space finds every dataset, run, knowledge base, export and
    download again. Call it before huggingface_hub is imported (it reads HF_HOME once). Returns the workspace root
    it chose, or None (the default ~/.mactuner: lost when the Space restarts)."""
    env = os.environ if env is None else env
    if sp is None or not sp.persistent:
        return None
    env.setdefault("MACTUNER_HOME", str(sp.workspace))
    env.setdefault("HF_HOME", str(sp.hf_home))
    return Path(env["MACTUNER_HOME"])


def storage_note(sp: Space | None) -> str | None:
    """What the header says about storage on a Space without persistent storage (else None)."""
    if sp is None or sp.persistent:
        return None
    return ("every dataset, run, knowledge base and export is lost when the Space restarts or sleeps. Add persistent "
            "storage in the Space's settings (it is mounted at /data) to keep them.")


# ------------------------------------------------------------------------------------------------------ login


def _names(text: str) -> frozenset[str]:
    return frozenset(n.casefold() for n in re.split(r"[\s,;]+", text or "") if n)


@dataclass(frozen=True)
class Login:
    """How the studio admits people: "password" (user, password), "oauth" (Hugging Face login of `allowed` users or
    members of `allowed` organisations) or "open" (nobody is asked)."""

    mode: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    allowed: frozenset[str] = frozenset()

    def admits(self, username: str | None, orgs: tuple[str, ...] | list[str] = ()) -> bool:
        """True when a Hugging Face user (and the organisations they belong to) may use the studio."""
        if self.mode != "oauth" or not username:
            return False
        return username.casefold() in self.allowed or any(o.casefold() in self.allowed for o in orgs if o)


def login_policy(sp: Space, env: Mapping[str, str] | None = None) -> Login:
    """Who may use the studio on this Space. A password secret wins; then the explicit opt-out; then Hugging Face
    login (the owner and MACTUNER_ALLOWED_USERS). With none of them the studio refuses to start: nobody else may
    train on the owner's hardware."""
    env = os.environ if env is None else env
    password = env.get("MACTUNER_PASSWORD", "")
    if password:
        user = env.get("MACTUNER_USER", "").strip() or sp.owner or "admin"
        if ":" in user:
            raise SpaceConfigError("MACTUNER_USER may not contain ':'.")
        return Login("password", user=user, password=password)
    if _flag(env, "MACTUNER_OPEN"):
        return Login("open")
    allowed = _names(env.get("MACTUNER_ALLOWED_USERS", "")) | ({sp.owner.casefold()} if sp.owner else frozenset())
    if sp.oauth and allowed:
        return Login("oauth", allowed=allowed)
    raise SpaceConfigError(
        "On a Space the studio requires a login, so that nobody else trains on your hardware. Keep `hf_oauth: true` "
        "in README.md (Hugging Face login: you and the users in MACTUNER_ALLOWED_USERS get in), or add the secret "
        "MACTUNER_PASSWORD (password login), or - to let anyone in - the secret MACTUNER_OPEN=1.")


def hub_identity(info: Mapping) -> tuple[str | None, tuple[str, ...]]:
    """(username, organisation names) from an OAuth userinfo or a whoami() answer."""
    name = info.get("preferred_username") or info.get("name")
    orgs = tuple(str(o.get("preferred_username") or o.get("name") or "") for o in info.get("orgs") or []
                 if isinstance(o, Mapping))
    return (str(name) if name else None), orgs


# --------------------------------------------------------------------------------------------------- hardware


def zero_gpu(env: Mapping[str, str] | None = None) -> bool:
    """ZeroGPU hardware (SPACES_ZERO_GPU): a GPU is lent only for the length of a @spaces.GPU call."""
    return _flag(os.environ if env is None else env, "SPACES_ZERO_GPU")


def training_refusal(env: Mapping[str, str] | None = None) -> str | None:
    """Why training cannot run here, or None."""
    if not zero_gpu(env):
        return None
    return ("Training is not available on ZeroGPU hardware: ZeroGPU lends a GPU for one call at a time, for a minute "
            "or two at most, far less than a training run, and nothing may keep running on it between calls. Chat, "
            "RAG and export work here. To train, duplicate this Space onto paid GPU hardware (e.g. Nvidia T4 small) "
            "in its settings, or onto CPU hardware (cpu-basic trains the Quick start in a few minutes).")
