from skipgrad.cli import main

raise SystemExit(main())
