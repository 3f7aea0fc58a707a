from kdship.cli import main

if __name__ == "__main__":  # vLLM spawns its engine process; keep the guard.
    main()
