"""Regenerates the committed Python code for the .proto files in this folder.

Generated code is committed (so installing walle needs no protoc); tests/test_protos_fresh.py
fails when it is stale. Run after editing a .proto:

    python protos/generate.py            # rewrite protos/*_pb2*.py
    python protos/generate.py --check    # exit 1 if anything would change
"""
import argparse
import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
IMPORT_ROOT = "walle/protos"  # generated modules import each other as walle.protos.X_pb2


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # test extra; not needed at run time
    import grpc_tools

    protos = sorted(HERE.glob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{IMPORT_ROOT}={HERE}", f"-I{include}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [f"{IMPORT_ROOT}/{p.name}" for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / IMPORT_ROOT).glob("*_pb2*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale files")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(pathlib.Path(tmp)):
            target = HERE / path.name
            if not target.exists() or target.read_bytes() != path.read_bytes():
                stale.append(target.name)
                if not args.check:
                    shutil.copyfile(path, target)
    if args.check and stale:
        print("stale generated code: " + ", ".join(stale) + " (run: python protos/generate.py)")
        return 1
    print(("up to date" if not stale else "regenerated: " + ", ".join(stale)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
