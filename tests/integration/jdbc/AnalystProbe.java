// What a BI tool (Metabase, DBeaver) does over the ClickHouse JDBC driver v2, printed one fact a
// line for tests/integration/test_analyst_views.py: the server's identity, its databases, the
// tables and columns of one database (DatabaseMetaData, as the tools browse), then a query.
//
//   java -cp <driver jars>:<dir> AnalystProbe URL USER PASSWORD DATABASE TABLE
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.Properties;

public class AnalystProbe {
    public static void main(String[] args) throws Exception {
        String url = args[0], database = args[3], table = args[4];
        Properties login = new Properties();
        login.setProperty("user", args[1]);
        login.setProperty("password", args[2]);
        try (Connection conn = DriverManager.getConnection(url, login)) {
            DatabaseMetaData meta = conn.getMetaData();
            System.out.println("product\t" + meta.getDatabaseProductName() + " " + meta.getDatabaseProductVersion());
            try (ResultSet schemas = meta.getSchemas()) {
                while (schemas.next()) {
                    System.out.println("schema\t" + schemas.getString("TABLE_SCHEM"));
                }
            }
            try (ResultSet tables = meta.getTables(null, database, "%", null)) {
                while (tables.next()) {
                    System.out.println("table\t" + tables.getString("TABLE_NAME"));
                }
            }
            try (ResultSet columns = meta.getColumns(null, database, table, "%")) {
                while (columns.next()) {
                    System.out.println("column\t" + columns.getString("COLUMN_NAME"));
                }
            }
            try (Statement statement = conn.createStatement();
                 ResultSet rows = statement.executeQuery(
                     "SELECT count() AS n, toString(sum(price)) AS total FROM " + database + "." + table)) {
                rows.next();
                System.out.println("count\t" + rows.getLong("n"));
                System.out.println("total\t" + rows.getString("total"));
            }
        }
    }
}
