from popo_verl.tiny import main

raise SystemExit(main())
