"""``python -m qtool`` and the ``qtool`` command: the command line (also what torchrun launches)."""


def main() -> None:
    from qtool.allocator import reexec_tuned

    reexec_tuned()  # before anything large is imported: glibc reads its tunables at process start
    from qtool.cli import app

    app(prog_name="qtool")  # after the exec, argv[0] would name `python -m qtool`


if __name__ == "__main__":
    main()
