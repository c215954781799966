"""Print the requirements the fleet image installs, one a line, from pyproject.toml.

    python3 k8s/image_requirements.py pyproject.toml s3,k8s

k8s/Dockerfile installs these in a layer of their own, before it copies the package
source, so a change to the source, README.md or anything else in pyproject.toml but the
dependencies reuses that layer (docker compares the list it copies, not pyproject.toml).
The list: the build system's requires (the package is then installed with
--no-build-isolation), the project's dependencies and those of each extra, with the
project's own extras that an extra names (``fleet[s3]``) followed. Standard library only:
it runs on the bare base image.
"""

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    name = pyproject["project"]["name"]
    optional = pyproject["project"].get("optional-dependencies", {})
    found = [*pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            sys.exit(f"{name} has no extra {extra!r} (it has {', '.join(sorted(optional))})")
        for requirement in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\s*\[([^\]]*)\]", requirement.strip())
            if own:
                todo += [e.strip() for e in own.group(1).split(",") if e.strip()]
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


def main() -> None:
    path, extras = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    with open(path, "rb") as f:
        pyproject = tomllib.load(f)
    wanted = [e.strip() for e in extras.split(",") if e.strip()]
    print("\n".join(requirements(pyproject, wanted)))


if __name__ == "__main__":
    main()
