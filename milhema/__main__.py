from milhema.cli import main

raise SystemExit(main())
