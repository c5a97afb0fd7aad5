"""MkDocs hooks (see mkdocs.yml): the repository's own relative links keep working in the site.

The guides in docs/ link to ``../benchmarks/*.md`` and ``../examples/*.py``, and README.md links
to ``docs/*.md``: that is how they read on GitHub. These hooks

* add README.md (as the home page, ``index.md``), CHANGELOG.md, benchmarks/ (its pages and plots)
  and examples/ (each script or config as a page showing its source) to the site, and
* rewrite every relative link, in every page, that points at one of those repository files to
  its place in the site.

A link to anything else is left as written, so that ``mkdocs build --strict`` fails on it (a
broken link, or a file that is not part of the site, e.g. under src/).
"""

from __future__ import annotations

import ast
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("mkdocs.hooks.torchnde")

# repository files added to the site as they are: repository path -> site path
_EXTRA_FILES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
_BENCHMARK_SUFFIXES = (".md", ".png")
_EXAMPLE_LANG = {".py": "python", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}

_repo_to_site: dict[str, str] = {}  # every repository file the site holds -> its site path
_site_to_repo: dict[str, str] = {}  # every page's site path -> its repository path


def _register(repo: str, site: str) -> None:
    _repo_to_site[repo] = site
    _site_to_repo[site] = repo


def _tracked(folder: str, suffixes) -> list[Path]:
    """The files under ``folder`` with one of ``suffixes``, skipping caches and work folders."""
    out = []
    for path in sorted((ROOT / folder).rglob("*")):
        rel = path.relative_to(ROOT)
        if not path.is_file() or path.suffix not in suffixes:
            continue
        if any(part.startswith(("_", ".")) for part in rel.parts[:-1]) or path.name.startswith("."):
            continue
        out.append(path)
    return out


def _example_page(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    code = path.read_text(encoding="utf-8")
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", code)), default=0))
    lang = _EXAMPLE_LANG[path.suffix]
    return f"# `{rel}`\n\nThe file `{rel}` of the repository.\n\n{fence}{lang}\n{code.rstrip()}\n{fence}\n"


def on_files(files: Files, config) -> Files:
    _page_names.clear()
    _repo_to_site.clear()
    _site_to_repo.clear()
    for f in list(files):
        _register(f"docs/{f.src_uri}", f.src_uri)
    for repo, site in _EXTRA_FILES.items():
        if files.get_file_from_path(site) is not None:
            log.warning(
                "docs/%s would replace the site's %s, which is the repository's %s: remove it", site, site, repo
            )
            continue
        files.append(File.generated(config, site, abs_src_path=str(ROOT / repo)))
        _register(repo, site)
    for path in _tracked("benchmarks", _BENCHMARK_SUFFIXES):
        rel = path.relative_to(ROOT).as_posix()
        files.append(File.generated(config, rel, abs_src_path=str(path)))
        _register(rel, rel)
    examples = _tracked("examples", tuple(_EXAMPLE_LANG))
    index = ["# Examples\n", "Runnable scripts and configuration files from the repository's `examples/` folder.\n"]
    for path in examples:
        rel = path.relative_to(ROOT).as_posix()
        site = f"{rel}.md"  # examples/spiral_neural_ode.py -> the page examples/spiral_neural_ode.py.html
        files.append(File.generated(config, site, content=_example_page(path)))
        _register(rel, site)
        summary = ""
        if path.suffix == ".py":
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            summary = f": {doc.splitlines()[0]}" if doc else ""
        index.append(f"- [`{rel}`]({posixpath.relpath(site, 'examples')}){summary}")
    files.append(File.generated(config, "examples/index.md", content="\n".join(index) + "\n"))
    return files


# [text](target "title") and <target>; reference definitions "[id]: target"
_INLINE = re.compile(r"(\]\(\s*<?)([^)\s>]+)")
_REFDEF = re.compile(r"^(\s{0,3}\[[^\]]+\]:\s*<?)(\S+?)(?=>?(\s|$))")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def _rewrite(target: str, repo_dir: str, site_dir: str, page_uri: str) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target  # a URL, an anchor on the same page or an absolute path
    path, sep, fragment = target.partition("#")
    repo = posixpath.normpath(posixpath.join(repo_dir, path))
    site = _repo_to_site.get(repo)
    if site is None:
        page_repo = _site_to_repo[page_uri]
        if page_repo != f"docs/{page_uri}":  # name the file to fix in mkdocs's warning that follows
            log.info(
                "the site's %s is the repository's %s: its link %r is to no file of the site",
                page_uri,
                page_repo,
                target,
            )
        return target
    return posixpath.relpath(site, site_dir or ".") + sep + fragment


def on_page_markdown(markdown: str, page, config, files) -> str:
    repo = _site_to_repo.get(page.file.src_uri)
    if repo is None:
        return markdown
    repo_dir, site_dir = posixpath.dirname(repo), posixpath.dirname(page.file.src_uri)
    lines, fence = markdown.split("\n"), None
    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence):
                fence = None
            continue
        if fence is not None:
            continue
        line = _INLINE.sub(lambda m: m.group(1) + _rewrite(m.group(2), repo_dir, site_dir, page.file.src_uri), line)
        lines[i] = _REFDEF.sub(lambda m: m.group(1) + _rewrite(m.group(2), repo_dir, site_dir, page.file.src_uri), line)
    return "\n".join(lines)


# The docstrings are written with reST roles, which Markdown renders as ":math:" or ":class:"
# followed by code: maths becomes MathJax markup (as pymdownx.arithmatex writes it), and a role
# naming an object becomes an optional cross-reference (resolved by mkdocs-autorefs where the API
# reference documents that object, plain code where it does not).
_MATH_ROLE = re.compile(r":math:<code>(.*?)</code>", re.S)
# :role:`name`, :role:`~a.b.name` (shown as "name") or :role:`title <a.b.name>`
_OBJECT_ROLE = re.compile(
    r":(?:class|func|meth|attr|mod|data|obj|exc):<code>(?:([^<]*?) ?&lt;(?=[^<]*&gt;</code>))?(~?)([A-Za-z_][\w.]*)(?:&gt;)?</code>"
)


def _exports(module: str) -> list[str]:
    """``module.__all__``, read from its source without importing it."""
    base = ROOT / "src" / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


_page_names: dict[str, dict[str, str]] = {}  # API page -> short name -> the object's public path


def _names_for(page_uri: str) -> dict[str, str]:
    """The names the docstrings on an API page may use unqualified: the exports of the modules it
    documents (its ``::: module`` lines), then those of ``torchnde``."""
    if page_uri not in _page_names:
        names: dict[str, str] = {}
        text = (ROOT / "docs" / page_uri).read_text(encoding="utf-8")
        for module in [*re.findall(r"^::: ([\w.]+)", text, re.M), "torchnde"]:
            for name in _exports(module):
                names.setdefault(name, f"{module}.{name}")
        _page_names[page_uri] = names
    return _page_names[page_uri]


def _object_role(match: re.Match, names: dict[str, str]) -> str:
    title, tilde, name = match.groups()
    label = f"<code>{title or (name.rsplit('.', 1)[-1] if tilde else name)}</code>"
    head, dot, rest = name.partition(".")
    if head != "torchnde":
        if head not in names:
            return label  # e.g. a method of the class being documented: left as code
        name = names[head] + dot + rest
    return f'<autoref identifier="{name}" optional>{label}</autoref>'


def on_page_content(html: str, page, config, files) -> str:
    html = _MATH_ROLE.sub(lambda m: f'<span class="arithmatex">\\({m.group(1)}\\)</span>', html)
    names = _names_for(page.file.src_uri) if page.file.src_uri.startswith("api/") else {}
    return _OBJECT_ROLE.sub(lambda m: _object_role(m, names), html)
