from masm.cli.main import main

raise SystemExit(main())
