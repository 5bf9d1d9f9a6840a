from backupkit.cli import main

raise SystemExit(main())
