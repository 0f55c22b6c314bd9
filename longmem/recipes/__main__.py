from longmem.recipes import main

main()
