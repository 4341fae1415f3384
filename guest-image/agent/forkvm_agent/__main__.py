from forkvm_agent.agent import main

main()
