"""`python -m genssd_cli.fake_teacher`, the path the docs and older scripts name: the test teacher
now lives in genssd_cli/teacher/servers/test_teacher.py."""

from genssd_cli.teacher.servers.test_teacher import main

if __name__ == "__main__":
    main()
