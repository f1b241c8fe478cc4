from fakescope.cli import main

raise SystemExit(main())
