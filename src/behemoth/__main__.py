from behemoth.cli import main

raise SystemExit(main())
